"""Context-parallel pooling (fused_pool.distributed) against all-gathering the hidden states.

    python benchmarks/distributed.py                  # 4 gloo ranks on CPU, the cases below
    python benchmarks/distributed.py --world-size 2 --reps 5

Spawns its ranks itself (gloo, file:// init, one thread each). Every rank holds its shard of the
sequence axis; two ways to pool the whole sequence, on the same backend ("cpu" here):

- `fused_pool.distributed`: each rank pools its tokens into partial states, all-gathered (one small
  metadata row, then the states) and combined in position order;
- `allgather`: all-gather the hidden-state shards (and the scores), concatenate them and run the
  single-device op on the whole sequence, as OpenRLHF / verl do today; its backward keeps this
  rank's slice of dx (no communication either).

`bytes_in` is what one rank receives per call, counted on the collectives that actually ran.
Times are the slowest rank's, median / p20 / p80 over the repetitions, forward (no grad) and
forward + backward. Writes benchmarks/results/distributed_<device>_<date-time>.csv and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_pool  # noqa: E402
import fused_pool.distributed as fd  # noqa: E402
from fused_pool.distributed import collective  # noqa: E402
from fused_pool.distributed.layout import slice_owners  # noqa: E402

COLUMNS = [
    "op", "layout", "format", "B", "L_or_T", "H", "heads", "dtype", "world_size", "backend", "method",
    "mode", "ms_p50", "ms_p20", "ms_p80", "bytes_in", "device", "torch", "commit", "date",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    op: str
    layout: str
    varlen: bool
    batch: int
    length: int  # global L (padded) or T (varlen)
    hidden: int
    heads: int = 1


CASES = [
    Case("masked_mean", "contiguous", False, 8, 2048, 1024),
    Case("masked_max", "zigzag", False, 8, 2048, 1024),
    Case("attention_pool", "contiguous", True, 8, 16384, 1024, heads=8),
    Case("query_attention_pool", "zigzag", False, 8, 2048, 1024, heads=8),
    Case("last_token", "contiguous", True, 8, 16384, 1024),
]

RECEIVED = [0]  # bytes this rank received from the others, in the collectives below


def _counting(all_gather_single):
    def counted(output, flat, group=None):
        RECEIVED[0] += flat.numel() * flat.element_size() * (dist.get_world_size(group) - 1)
        return all_gather_single(output, flat, group=group)

    return counted


def _all_gather_cat(t: torch.Tensor, dim: int, rank: int, order: list[int] | None = None) -> torch.Tensor:
    """The baseline: every rank's piece, with this rank's own (differentiable) in its place."""
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, t.detach().contiguous())
    RECEIVED[0] += t.numel() * t.element_size() * (len(pieces) - 1)
    pieces[rank] = t
    if order is None:
        return torch.cat(pieces, dim)
    halves = [half for piece in pieces for half in piece.chunk(2, dim)]  # zigzag: rank r's 2 slices
    return torch.cat([halves[i] for i in order], dim)


def _inputs(case: Case, rank: int, world_size: int, dtype):
    gen = torch.Generator().manual_seed(rank)
    local = case.length // world_size
    if case.varlen:
        lengths = torch.full((case.batch,), case.length // case.batch)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        shape, kwargs = (local,), dict(cu_seqlens=cu)
    else:
        shape, kwargs = (case.batch, local), {}
    x = torch.randn(*shape, case.hidden, generator=gen).to(dtype).requires_grad_()
    other = None
    if case.op == "attention_pool":
        other = torch.randn(*shape, case.heads, generator=gen).to(dtype).requires_grad_()
    if case.op == "query_attention_pool":
        other = torch.randn(case.heads, case.hidden // case.heads, generator=torch.Generator().manual_seed(9))
        other = other.to(dtype).requires_grad_()
    return x, other, kwargs


def _methods(case: Case, rank: int, world_size: int, backend: str):
    """{method: fn(x, other, kwargs) -> (B, H)}."""
    backend_arg = {} if case.op in ("first_token", "last_token") else dict(backend=backend)
    dim = 0 if case.varlen else 1
    order = slice_owners("zigzag", world_size) if case.layout == "zigzag" else None
    per_token = case.op == "attention_pool"

    def distributed(x, other, kwargs):
        args = (x,) if other is None else (x, other)
        return getattr(fd, case.op)(*args, layout=case.layout, **kwargs, **backend_arg)

    def allgather(x, other, kwargs):
        whole = _all_gather_cat(x, dim, rank, order)
        if per_token:
            other = _all_gather_cat(other, dim, rank, order)
        args = (whole,) if other is None else (whole, other)
        return getattr(fused_pool, case.op)(*args, **kwargs, **backend_arg)

    return {"fused_pool.distributed": distributed, "allgather": allgather}


def _time(fn, reps: int) -> list[float]:
    """Per repetition: the slowest rank's seconds."""
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return times


def _measure(case: Case, method: str, fn, inputs, dtype, reps: int) -> list[dict]:
    """Rows for fwd and fwd+bwd of one method on one case."""
    x, other, kwargs = inputs
    leaves = [t for t in (x, other) if t is not None]
    grad = torch.randn(case.batch, case.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)

    def forward():
        with torch.no_grad():
            fn(x, other, kwargs)

    def forward_backward():
        torch.autograd.grad(fn(x, other, kwargs), leaves, grad)

    RECEIVED[0] = 0
    forward()  # warm-up, and the bytes of one call
    bytes_in = RECEIVED[0]
    rows = []
    for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = sorted(_time(call, reps))
        rows.append(
            dict(
                op=case.op, layout=case.layout, format="varlen" if case.varlen else "padded", B=case.batch,
                L_or_T=case.length, H=case.hidden, heads=case.heads, dtype=str(dtype).removeprefix("torch."),
                method=method, mode=mode, ms_p50=statistics.median(times) * 1e3, ms_p20=_quantile(times, 0.2),
                ms_p80=_quantile(times, 0.8), bytes_in=bytes_in,
            )
        )  # fmt: skip
    return rows


def _quantile(sorted_seconds: list[float], q: float) -> float:
    return sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1e3


def _worker(rank: int, world_size: int, tmp: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world_size)
    collective._ALL_GATHER_SINGLE = _counting(collective._ALL_GATHER_SINGLE)
    dtype = getattr(torch, args.dtype)
    rows = []
    for case in CASES:
        inputs = _inputs(case, rank, world_size, dtype)
        for method, fn in _methods(case, rank, world_size, args.backend).items():
            for row in _measure(case, method, fn, inputs, dtype, args.reps):
                rows.append(dict(row, world_size=world_size, backend=args.backend))
    if rank == 0:
        Path(tmp, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        spawn_args = (args.world_size, tmp, args)
        mp.start_processes(_worker, args=spawn_args, nprocs=args.world_size, start_method="spawn")
        rows = json.loads(Path(tmp, "rows.json").read_text())

    from environment import environment, results_csv, write_rows  # the device / version / commit columns

    env = environment("cpu")
    for row in rows:
        row.update({k: env[k] for k in ("device", "torch", "commit", "date")})
    path = results_csv(args.out, "distributed", env["device"])
    write_rows(path, rows, COLUMNS, ".4g")
    print_table(rows)
    print(f"\nwrote {path}")


def print_table(rows: list[dict]) -> None:
    """One line per (case, mode): both methods' medians, the speedup, and the bytes each receives."""
    print(
        f"{'op':<22}{'layout':<11}{'format':<7}{'shape':<18}{'mode':<8}"
        f"{'dist ms':>9}{'gather ms':>10}{'speedup':>9}{'dist bytes':>12}{'gather bytes':>14}{'ratio':>9}"
    )
    keyed = {(r["op"], r["layout"], r["format"], r["mode"], r["method"]): r for r in rows}
    for r in rows:
        if r["method"] != "fused_pool.distributed":
            continue
        base = keyed[(r["op"], r["layout"], r["format"], r["mode"], "allgather")]
        padded = r["format"] == "padded"
        shape = f"{r['B']}x{r['L_or_T']}x{r['H']}" if padded else f"T={r['L_or_T']} H={r['H']}"
        print(
            f"{r['op']:<22}{r['layout']:<11}{r['format']:<7}{shape:<18}{r['mode']:<8}"
            f"{r['ms_p50']:>9.2f}{base['ms_p50']:>10.2f}{base['ms_p50'] / r['ms_p50']:>8.1f}x"
            f"{r['bytes_in']:>12,}{base['bytes_in']:>14,}{base['bytes_in'] / max(r['bytes_in'], 1):>8.0f}x"
        )


if __name__ == "__main__":
    main()
