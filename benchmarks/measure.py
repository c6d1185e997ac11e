"""Timing, the byte floor, copy bandwidth, peak memory and per-call latency.

Timing. GPU: triton.testing.do_bench, which clears a 256 MB buffer before every repetition (more
than 3x the L2 of an H100 or H200), so no input is L2-hot; quantiles 0.5 / 0.2 / 0.8 of the
per-repetition times. CPU: torch.utils.benchmark's blocked_autorange, quantiles over its blocks.

Byte floor: what any implementation must move, in bytes (e = x's element size):
  forward:  kept tokens * H * e (x, padding skipped) + mask (B * L * 1, bool) or cu_seqlens
            ((B + 1) * 4) + scores (kept tokens * nh * e) or query (H * e) + output (B * H_out * e)
  backward: dx (all B * L * H * e, padding rows included: they must be written as 0) + grad of
            the output (B * H_out * e) + mask / cu_seqlens; attention also re-reads the kept x
            and scores and writes dscores (B * L * nh * e); query attention writes dquery.
  fwd+bwd:  the sum of both.
Achieved GB/s = floor / time; % of copy bandwidth = that / the device-copy bandwidth measured in
the same run (a large tensor copy: read + write bytes / time).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from cases import Inputs

QUANTILES = (0.5, 0.2, 0.8)


def keep_freed_memory_on_cpu() -> bool:
    """Tells glibc malloc to keep freed blocks instead of returning them to the OS.

    Otherwise a fresh (B, L, H) buffer is page-faulted in on every call for some providers and
    not others, and CPU timings swing 2-3x from run to run. Every provider gets the same allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def minor_page_faults() -> int:
    """Minor page faults of this process so far: on CPU, first touches of freshly mapped memory
    (the main source of run-to-run spread there; the CSV records them per call)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_ms(fn: Callable[[], object], device: str, budget_s: float) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds per call."""
    if device == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)), quantiles=list(QUANTILES))
        return p50, p20, p80
    import torch.utils.benchmark as benchmark

    fn()  # warm-up
    measurement = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget_s)
    times = sorted(t * 1e3 for t in measurement.times)
    if len(times) < 3:
        return (times[len(times) // 2],) * 3
    cuts = statistics.quantiles(times, n=10, method="inclusive")  # deciles
    return statistics.median(times), cuts[1], cuts[7]


def wall_us_per_call(fn: Callable[[], object], device: str, calls: int = 200) -> float:
    """Eager wall-clock per call, back to back (what a small batch costs, launch overhead included)."""
    for _ in range(10):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def copy_bandwidth_gbps(device: str) -> float:
    """Device-copy bandwidth: read + write bytes of a large copy over its time."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device, budget_s=0.5)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory allocated while fn runs, beyond what was allocated before (outputs included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's native logger prints a line per start / stop)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def floor_bytes(op: str, mode: str, inputs: Inputs) -> int:
    """The bytes any implementation must move (module docstring)."""
    e = inputs.x.element_size()
    hidden = inputs.x.shape[-1]
    batch, kept, rows = inputs.batch, inputs.kept_tokens, inputs.rows
    heads = inputs.scores.shape[-1] if inputs.scores.dim() == inputs.x.dim() else 1
    out_hidden = 2 * hidden if op == "masked_mean_max" else hidden
    structure = inputs.mask.numel() if inputs.mask is not None else inputs.cu_seqlens.numel() * 4
    attention = op in ("attention_pool", "query_attention_pool")
    side = 0
    if op == "attention_pool":
        side = kept * heads * e
    elif op == "query_attention_pool":
        side = hidden * e
    forward = kept * hidden * e + structure + side + batch * out_hidden * e
    backward = rows * hidden * e + batch * out_hidden * e + structure
    if attention:
        backward += kept * hidden * e + side + (rows * heads * e if op == "attention_pool" else 0)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
