"""linear_pool (a SPLADE head: log(1 + relu(x W^T + b)) pooled over the tokens) against what people
write today. Called by run.py (--ops linear_pool, in every sweep), or alone:

    python benchmarks/linear.py                      # the issue's CPU target (CUDA when present)
    python benchmarks/linear.py --quick --device cpu

Providers, each a function of (x, weight, bias) on the same padded inputs:
- `fused_pool:<backend>`: one `fused_pool.linear_pool` call (every backend with the linear op that runs
  on the device; "torch" is the chunked PyTorch backend; Triton's CPU interpreter is not timed);
- `torch:eager`: the unfused code, `F.linear`, the activation, then the masked max or sum;
- `torch:compile`: torch.compile of that code (not in --quick: compiling costs minutes on 2 cores);
  in --quick also no `st:splade_chunked` (its one case is a single chunk long);
- `st:splade` / `st:splade_chunked`: sentence-transformers' SpladePooling on the logits `F.linear`
  gives, as SparseEncoder models run it (its activation_function "relu" is log(1 + relu z)), without
  and with `chunk_size`; eval mode (in-place) for the forward, train mode for forward + backward.

Columns: time (p50 / p20 / p80), peak memory above the inputs (peak_memory_bytes; CPU: resident
memory), TFLOP/s of the projection (2 T H N per pass over the T kept tokens; forward + backward counts
three passes, the dense-equivalent training cost, as model-FLOPs utilization does), as % of the same-run
`torch.matmul` throughput for the same (T, H) x (H, N) GEMM; the max abs difference from torch:eager.
Writes benchmarks/results/linear_<device>_<date>.csv and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
from environment import environment, results_csv, write_rows  # noqa: E402

import fused_pool  # noqa: E402
from fused_pool.backends import extension, unavailable_reason  # noqa: E402

COLUMNS = [
    "op", "B", "L", "H", "N", "T", "kept_fraction", "dtype", "activation", "pool", "mode", "provider",
    "ms_p50", "ms_p20", "ms_p80", "peak_mem_bytes", "tflops", "pct_of_matmul", "matmul_tflops",
    "max_abs_err_vs_eager",
]  # fmt: skip
ACTIVATION = "log1p_relu"  # SPLADE's log(1 + relu z)
POOLS = ("max", "sum")
PASSES = ("fwd", "fwd+bwd")
SPLADE_CHUNK = 32  # tokens per SpladePooling chunk


@dataclass(frozen=True)
class LinearCase:
    batch: int
    length: int
    hidden: int
    features: int
    kept_fraction: float = 0.8

    def label(self) -> str:
        return (
            f"B={self.batch} L={self.length} H={self.hidden} N={self.features} kept={self.kept_fraction:.0%}"
        )


def sweep(device: str, quick: bool) -> list[LinearCase]:
    if quick:  # small enough for run.py --quick on 2 cores
        return [LinearCase(2, 32, 768, 30522)]
    cases = [LinearCase(8, 128, 768, 30522)]  # the CPU target (BERT vocabulary, 20% padding)
    if device == "cuda":
        cases += [LinearCase(32, 256, 768, 30522), LinearCase(64, 512, 1024, 50265)]
    return cases


@dataclass
class Inputs:
    x: torch.Tensor  # (B, L, H)
    weight: torch.Tensor  # (N, H)
    bias: torch.Tensor  # (N,)
    mask: torch.Tensor  # (B, L) bool, right padding

    @property
    def kept_tokens(self) -> int:
        return int(self.mask.sum())


def make_inputs(case: LinearCase, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    # Lengths evenly spread around kept_fraction * L (as wide as [1, L] allows), so that exactly that
    # fraction is kept even in a small batch.
    mean = case.kept_fraction * case.length
    half_width = min(mean - 1, case.length - mean)
    lengths = torch.linspace(mean - half_width, mean + half_width, case.batch).round().long()
    x = torch.randn(case.batch, case.length, case.hidden, generator=gen)
    weight = torch.randn(case.features, case.hidden, generator=gen) * case.hidden**-0.5
    bias = torch.randn(case.features, generator=gen) * 0.5 - 1  # most logits negative, as an MLM head's
    mask = torch.arange(case.length) < lengths[:, None]
    move = lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype)
    return Inputs(move(x), move(weight), move(bias), mask.to(device))


# --- the code people write today -------------------------------------------------------------------


def eager(x, weight, bias, mask, pool: str):
    """F.linear, the activation, the masked reduction: the (B, L, N) values exist in full."""
    values = torch.log1p(torch.relu(F.linear(x, weight, bias)))
    if pool == "max":
        return values.masked_fill(~mask[..., None], float("-inf")).amax(1)
    return (values * mask[..., None].to(values.dtype)).sum(1)


@functools.cache
def _compiled(pool: str, grad: bool):
    del grad  # one graph per (pool, grad mode): inference and training graphs do not recompile
    return torch.compile(functools.partial(eager, pool=pool))


def _splade_pooling_class():
    try:
        from sentence_transformers.sparse_encoder.modules import SpladePooling
    except ImportError:
        try:
            from sentence_transformers.sparse_encoder.models import SpladePooling
        except ImportError:
            return None
    return SpladePooling


def providers(device: str, quick: bool) -> list[str]:
    has_op = extension() is not None and hasattr(torch.ops.fused_pool, "ext_linear_fwd")
    has_triton = (Path(fused_pool.__file__).parent / "triton_kernels" / "linear.py").exists()
    names = []
    for backend in fused_pool.available_backends():
        usable = unavailable_reason(backend, torch.device(device)) is None
        interpreted = backend == "triton" and device == "cpu"
        present = {"cpu": has_op, "cuda": has_op, "triton": has_triton}.get(backend, True)
        if usable and present and not interpreted:
            names.append(f"fused_pool:{backend}")
    names += ["torch:eager"] + ([] if quick else ["torch:compile"])
    if _splade_pooling_class() is not None:  # --quick: L = 32, one chunk: no chunked peer
        names += ["st:splade"] + ([] if quick else ["st:splade_chunked"])
    return names


def build(provider: str, inputs: Inputs, pool: str, grad: bool):
    """f(x, weight, bias) -> (B, N), the provider's way."""
    mask = inputs.mask
    if provider.startswith("fused_pool:"):
        backend = provider.split(":")[1]
        return lambda x, w, b: fused_pool.linear_pool(
            x, w, b, mask, mode=pool, activation=ACTIVATION, backend=backend
        )
    if provider == "torch:eager":
        return lambda x, w, b: eager(x, w, b, mask, pool)
    if provider == "torch:compile":
        compiled = _compiled(pool, grad)
        return lambda x, w, b: compiled(x, w, b, mask)
    if provider.startswith("st:splade"):
        chunk = SPLADE_CHUNK if provider == "st:splade_chunked" else None
        module = _splade_pooling_class()(pooling_strategy=pool, activation_function="relu", chunk_size=chunk)
        module.train(grad)
        features = lambda x, w, b: {"token_embeddings": F.linear(x, w, b), "attention_mask": mask}
        return lambda x, w, b: module(features(x, w, b))["sentence_embedding"]
    raise ValueError(provider)


# --- measuring ---------------------------------------------------------------------------------------


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+) kB", status.read()).group(1)) * 1024


def peak_memory_bytes(fn, device: str) -> int:
    """Peak memory above what was in use before fn. CUDA: the caching allocator's peak. CPU (Linux):
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the one before, with
    glibc returning every block of 64 KiB or more while fn runs, so that the extension's and compiled
    code's workspaces count too (the profiler measure.py uses does not see all of them)."""
    if device == "cuda" or not Path("/proc/self/clear_refs").exists():
        return measure.peak_memory_bytes(fn, device)
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 << 10)
    libc.malloc_trim(0)
    try:
        before = _resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        fn()
        return _resident_bytes("VmHWM") - before
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)  # measure.keep_freed_memory_on_cpu's setting


def matmul_tflops(inputs: Inputs, device: str, budget: float) -> float:
    """torch.matmul's throughput for the projection's GEMM, (T, H) x (H, N), in this run."""
    tokens = inputs.x[inputs.mask]
    weight_t = inputs.weight.t()
    p50, _, _ = measure.time_ms(lambda: torch.matmul(tokens, weight_t), device, budget)
    return 2 * tokens.shape[0] * weight_t.shape[0] * weight_t.shape[1] / (p50 * 1e-3) / 1e12


def measure_one(provider, inputs, pool, mode, device, budget, expected) -> dict:
    grad_mode = mode == "fwd+bwd"
    fn = build(provider, inputs, pool, grad_mode)
    args = [inputs.x, inputs.weight, inputs.bias]
    with torch.no_grad():
        error = (fn(*args).float() - expected).abs().max().item()
    if grad_mode:
        leaves = [t.detach().requires_grad_() for t in args]
        grad = torch.randn_like(expected).to(inputs.x.dtype)
        call = lambda: torch.autograd.grad(fn(*leaves), leaves, grad)
    else:

        def call():
            with torch.no_grad():
                return fn(*args)

    p50, p20, p80 = measure.time_ms(call, device, budget)
    return dict(
        ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mem_bytes=peak_memory_bytes(call, device),
        max_abs_err_vs_eager=error,
    )  # fmt: skip


def _describe(case: LinearCase, inputs: Inputs, dtype, pool: str, mode: str, provider: str) -> dict:
    kept = inputs.kept_tokens
    return dict(
        op="linear_pool", B=case.batch, L=case.length, H=case.hidden, N=case.features, T=kept,
        kept_fraction=round(kept / inputs.mask.numel(), 4), dtype=str(dtype)[6:], activation=ACTIVATION,
        pool=pool, mode=mode, provider=provider,
    )  # fmt: skip


def run(
    device: str, quick: bool, budget: float, env: dict, names=None, dtypes=None, modes=None
) -> list[dict]:
    """Every (case, dtype, pool, pass, provider) row; prints progress and skips a provider that fails."""
    names = [n for n in (names or providers(device, quick)) if n in providers(device, quick=False)]
    dtypes = dtypes or ([torch.bfloat16] if device == "cuda" else [torch.float32])
    modes = [m for m in (modes or PASSES) if m in PASSES]
    rows = []
    for case in sweep(device, quick):
        for dtype in dtypes:
            inputs = make_inputs(case, dtype, device)
            gemm = matmul_tflops(inputs, device, budget)
            flops = 2 * inputs.kept_tokens * case.hidden * case.features
            for pool in POOLS:
                with torch.no_grad():
                    expected = eager(inputs.x, inputs.weight, inputs.bias, inputs.mask, pool).float()
                for mode in modes:
                    for name in names:
                        print(f"linear_pool {case.label()} {str(dtype)[6:]} {pool} {mode} {name}", flush=True)
                        try:
                            result = measure_one(name, inputs, pool, mode, device, budget, expected)
                        except Exception as error:  # a peer that cannot run a case is reported
                            print(f"skipped {name}: {type(error).__name__}: {error}")
                            continue
                        rows.append(dict(**_describe(case, inputs, dtype, pool, mode, name), **result, **env))
                        passes = 3 if mode == "fwd+bwd" else 1
                        rows[-1]["tflops"] = passes * flops / (result["ms_p50"] * 1e-3) / 1e12
                        rows[-1].update(pct_of_matmul=100 * rows[-1]["tflops"] / gemm, matmul_tflops=gemm)
    return rows


def write_csv(rows: list[dict], out: Path, env: dict, quick: bool) -> Path:
    path = results_csv(out, "linear", env["device"], quick)
    write_rows(path, rows, COLUMNS + list(env), ".6g")
    return path


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per (case, pool, pass, provider), with the speedup over torch:eager."""
    eager_ms = {
        (r["B"], r["L"], r["dtype"], r["pool"], r["mode"]): r["ms_p50"]
        for r in rows
        if r["provider"] == "torch:eager"
    }
    print(
        "| case | dtype | pool | pass | provider | ms (p50) | peak MiB | TFLOP/s | % of matmul | vs eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = eager_ms.get((r["B"], r["L"], r["dtype"], r["pool"], r["mode"]))
        speedup = f"{base / r['ms_p50']:.2f}x" if base else "-"
        case = f"B={r['B']} L={r['L']} H={r['H']} N={r['N']} kept {r['kept_fraction']:.0%}"
        print(
            f"| {case} | {r['dtype']} | {r['pool']} | {r['mode']} | {r['provider']} | {r['ms_p50']:.1f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['tflops']:.3f} | {r['pct_of_matmul']:.0f}% | {speedup} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="a small case, no torch.compile")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.device == "cpu":
        measure.keep_freed_memory_on_cpu()
    env = environment(args.device)
    budget = args.budget or (0.1 if args.quick else 0.3)
    rows = run(args.device, args.quick, budget, env, names=args.providers)
    print(f"wrote {write_csv(rows, args.out, env, args.quick)}")
    print_table(rows)


if __name__ == "__main__":
    main()
