"""span_pool (late chunking) against what people write today.

    python benchmarks/span.py                 # the cases below, on CUDA when present, else CPU
    python benchmarks/span.py --device cpu --budget 0.5

Providers, forward (no grad) and forward + backward (gradient of x):
- `fused_pool:<backend>`: one `fused_pool.span_pool` call for every span (each backend that runs on
  the device);
- `loop`: one mean per span in Python, `torch.stack([x[a:b].mean(0) for a, b in spans])`, as
  jina-ai/late-chunking and chonkie do (the spans read back to the host once, outside the timing);
- `segment_reduce`: `torch.segment_reduce(x, "mean", lengths=...)`, only where the spans partition
  the tokens (it cannot express gaps or overlaps).

Cases: 8 documents x 1024 tokens x H = 384 (all-MiniLM sizes), 32 chunks each, as a partition and
as overlapping windows (each chunk extended by half a chunk on both sides); on a GPU also a large
partition (64 documents x 4096 tokens x H = 1024). Writes benchmarks/results/span_<device>_<date>.csv
and prints a table with each provider's time and the speedup of the fused call over the loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import environment, results_csv, write_rows  # noqa: E402
from measure import keep_freed_memory_on_cpu, time_ms  # noqa: E402

import fused_pool  # noqa: E402
from fused_pool.backends import unavailable_reason  # noqa: E402

COLUMNS = ["case", "T", "H", "S", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80"]


def chunk_spans(documents: int, length: int, chunks: int, overlapping: bool, seed: int = 0) -> torch.Tensor:
    """(documents * chunks, 2) token spans: each document cut at random points into `chunks`
    pieces; overlapping: each piece widened by half its length on both sides (within its document)."""
    generator = torch.Generator().manual_seed(seed)
    spans = []
    for d in range(documents):
        cuts = torch.randperm(length - 1, generator=generator)[: chunks - 1].sort().values + 1
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([length])])
        starts, ends = bounds[:-1], bounds[1:]
        if overlapping:
            half = (ends - starts) // 2
            starts, ends = (starts - half).clamp(min=0), (ends + half).clamp(max=length)
        spans.append(torch.stack([starts, ends], 1) + d * length)
    return torch.cat(spans)


def providers(x: torch.Tensor, spans: torch.Tensor, partition: bool) -> dict:
    """name -> a function of x giving the (S, H) means."""
    bounds = spans.tolist()
    found = {}
    for backend in fused_pool.available_backends():
        interpreted = backend == "triton" and x.device.type == "cpu"  # Triton's interpreter: not timed
        if unavailable_reason(backend, x.device) is None and not interpreted:
            found[f"fused_pool:{backend}"] = lambda x, b=backend: fused_pool.span_pool(x, spans, backend=b)
    found["loop"] = lambda x: torch.stack([x[a:b].mean(0) for a, b in bounds])
    if partition:
        lengths = spans[:, 1] - spans[:, 0]
        found["segment_reduce"] = lambda x: torch.segment_reduce(x, "mean", lengths=lengths, axis=0)
    return found


def measure(case: str, x: torch.Tensor, spans: torch.Tensor, partition: bool, budget: float) -> list[dict]:
    rows = []
    device = x.device.type
    expected = torch.stack([x[a:b].double().mean(0) for a, b in spans.tolist()])
    for name, pool in providers(x, spans, partition).items():
        torch.testing.assert_close(pool(x).double(), expected, atol=1e-4, rtol=1e-4)  # same answer
        grad = torch.randn(spans.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        xg = x.detach().requires_grad_()

        def forward(pool=pool):
            with torch.no_grad():
                pool(x)

        def forward_backward(pool=pool, xg=xg, grad=grad):
            torch.autograd.grad(pool(xg), xg, grad)

        for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            p50, p20, p80 = time_ms(fn, device, budget)
            rows.append(
                dict(case=case, T=x.shape[0], H=x.shape[1], S=spans.shape[0], dtype=str(x.dtype)[6:],
                     mode=mode, provider=name, ms_p50=p50, ms_p20=p20, ms_p80=p80)
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.device == "cpu":
        keep_freed_memory_on_cpu()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cases = [("8 docs x 1024, 32 chunks each", 8, 1024, 384, 32)]
    if args.device == "cuda":
        cases.append(("64 docs x 4096, 64 chunks each", 64, 4096, 1024, 64))
    rows = []
    for label, documents, length, hidden, chunks in cases:
        x = torch.randn(documents * length, hidden, dtype=dtype, device=args.device)
        for overlapping in (False, True):
            spans = chunk_spans(documents, length, chunks, overlapping).to(args.device)
            case = f"{label}, {'overlapping' if overlapping else 'partition'}"
            rows += measure(case, x, spans, partition=not overlapping, budget=args.budget)
    env = environment(args.device)
    path = results_csv(args.out, "span", env["device"])
    write_rows(path, [{**row, **env} for row in rows], COLUMNS + list(env))
    print(f"wrote {path}")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per (case, mode, provider), with the speedup over the per-span loop."""
    loop = {(r["case"], r["mode"]): r["ms_p50"] for r in rows if r["provider"] == "loop"}
    print("| case | mode | provider | ms (p50) | vs loop |")
    print("|---|---|---|---|---|")
    for r in rows:
        speedup = loop[r["case"], r["mode"]] / r["ms_p50"]
        print(f"| {r['case']} | {r['mode']} | {r['provider']} | {r['ms_p50']:.3f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
