"""Worker of tests/distributed/test_distributed.py: one rank of a gloo group that runs every case of
its world size against the single-device reference, then writes its failures as JSON.

    PYTHONPATH=tests python tests/distributed/distributed_cases.py --rank R --world-size W \
        --init-file PATH --out PATH

Every rank builds the same global inputs from the case's seed, takes its own shard, runs the
distributed op twice (forward and backward) and checks: the output against the reference on the
whole input, its own tokens' gradients against the reference's, dquery summed over the ranks, the
output bitwise equal on every rank and run to run. Then the bad inputs: each must raise the same
error on every rank. The group has a timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from helpers import assert_close, assert_within_reference_error, cu_seqlens_of, make_generator

import fused_pool.distributed as fd
from fused_pool import available_backends, reference

# Every pooling op with a context-parallel form (span_pool pools arbitrary token spans: it has none).
OPS = tuple(op for op in reference.__all__ if op in fd.__all__)
FORMATS = (("contiguous", False), ("contiguous", True), ("zigzag", False), ("zigzag", True))
SELECTIONS = ("masked_max", "first_token", "last_token")  # outputs are copies of x: exact
BATCH, HIDDEN, HEADS = 4, 8, 2


@dataclass(frozen=True)
class Case:
    op: str
    layout: str
    varlen: bool
    # "mask": masks / empty sequences / weights; "ties": integer x, -inf scores; "late_tie": the
    # maximum of sequence 0 in zigzag slices 1 (rank 1) and 2W-1 (rank 0): slice 1 must win
    variant: str
    backend: str
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        kind = "varlen" if self.varlen else "padded"
        return f"{self.op}-{self.layout}-{kind}-{self.variant}-{self.backend}-{str(self.dtype)[6:]}"


def cases(world_size: int) -> list[Case]:
    backends = {2: ("cpu", "torch"), 3: ("cpu", "torch"), 4: ("cpu",)}[world_size]
    found = [
        Case(op, layout, varlen, variant, backend)
        for backend, op, (layout, varlen), variant in itertools.product(
            backends, OPS, FORMATS, ("mask", "ties")
        )
    ]
    found += [
        Case(op, "zigzag", varlen, "late_tie", backend)
        for backend, op, varlen in itertools.product(
            backends, ("masked_max", "masked_mean_max"), (False, True)
        )
    ]
    found += [
        Case("masked_mean", "zigzag", False, "mask", "cpu", torch.bfloat16),
        Case("attention_pool", "contiguous", True, "mask", "cpu", torch.bfloat16),
        Case("masked_mean_max", "contiguous", False, "mask", "torch", torch.float64),
    ]
    if world_size == 2:  # Triton through its interpreter: slow, a few cases
        found += [
            Case("masked_mean_max", "zigzag", True, "mask", "triton"),
            Case("masked_max", "contiguous", False, "ties", "triton"),
            Case("attention_pool", "contiguous", True, "ties", "triton"),
            Case("query_attention_pool", "zigzag", False, "mask", "triton"),
        ]
    return found


# --- global inputs and how they are sharded -------------------------------------------------------


@dataclass
class Sharding:
    """Cuts a global per-token tensor ((B, L, ...) padded, (T, ...) varlen real tokens) into a
    rank's piece, as the layout says."""

    layout: str
    varlen: bool
    world_size: int
    cuts: list[int] | None = None  # contiguous: rank r holds [cuts[r], cuts[r + 1])
    cu_seqlens_padded: torch.Tensor | None = None  # zigzag varlen
    real_rows: torch.Tensor | None = None  # zigzag varlen: the padded row of every real token

    def local(self, t: torch.Tensor, rank: int, fill: float = 0.0) -> torch.Tensor:
        dim = 0 if self.varlen else 1
        if self.layout == "contiguous":
            return t.narrow(dim, self.cuts[rank], self.cuts[rank + 1] - self.cuts[rank]).clone()
        if not self.varlen:
            return fd.shard(t, rank=rank, world_size=self.world_size, layout="zigzag", dim=1).clone()
        padded = t.new_full((int(self.cu_seqlens_padded[-1]), *t.shape[1:]), fill)
        padded[self.real_rows] = t
        return fd.shard(
            padded,
            rank=rank,
            world_size=self.world_size,
            layout="zigzag",
            dim=0,
            cu_seqlens_padded=self.cu_seqlens_padded,
        )


def _cuts(total: int, world_size: int, gen) -> list[int]:
    """Uneven cut points, often with an empty shard."""
    inner = sorted(torch.randint(0, total + 1, (world_size - 1,), generator=gen).tolist())
    if world_size > 2 and torch.rand((), generator=gen) < 0.5:
        inner[0] = inner[1]  # rank 1 holds nothing
    return [0, *inner, total]


def global_inputs(case: Case, world_size: int, seed: int):
    """(reference inputs dict, Sharding) for a case, the same on every rank."""
    gen = make_generator(seed)
    parts = 2 * world_size
    if case.varlen:
        lengths = torch.randint(0, 13, (BATCH,), generator=gen).tolist()
        lengths[1] = 0  # an empty sequence
        if case.variant == "late_tie":
            lengths[0] = 2 * parts  # no padding: slices of 2 tokens
        tokens = sum(lengths)
        shape = (tokens,)
    else:
        length = parts * int(torch.randint(1, 4, (), generator=gen)) if case.layout == "zigzag" else 11
        shape = (BATCH, length)
    if case.variant == "ties":
        x = torch.randint(-2, 3, (*shape, HIDDEN), generator=gen).to(case.dtype)
    else:
        x = torch.randn(*shape, HIDDEN, generator=gen).to(case.dtype)
    inputs = dict(x=x, mask=None, cu_seqlens=None)
    if case.varlen:
        inputs["cu_seqlens"] = cu_seqlens_of(lengths, torch.int64 if seed % 2 else torch.int32)
        if case.op == "masked_mean" and case.variant == "mask":
            inputs["mask"] = torch.rand(tokens, generator=gen) * 1.75 + 0.25  # per-token weights
    elif case.variant == "mask":
        keep = torch.rand(shape, generator=gen) > 0.4
        keep[1] = False  # an empty sequence
        keep[2] = torch.arange(shape[1]) >= shape[1] - 3  # left padding
        inputs["mask"] = (
            torch.where(keep, torch.rand(shape, generator=gen) + 0.5, 0) if case.op == "masked_mean" else keep
        )
        inputs["x"] = x.masked_fill(~keep[..., None], float("nan"))  # padding is never read
    if case.op == "attention_pool":
        scores = (torch.randn(*shape, HEADS, generator=gen) * 2).to(case.dtype)
        if case.variant == "ties":
            scores[torch.rand(scores.shape, generator=gen) < 0.3] = float("-inf")
            scores[: 2 if not case.varlen else scores.shape[0] // 3] = float("-inf")  # all -inf: empty
        inputs["scores"] = scores
    if case.op == "query_attention_pool":
        inputs["query"] = torch.randn(HEADS, HIDDEN // HEADS, generator=gen).to(case.dtype)

    sharding = Sharding(case.layout, case.varlen, world_size)
    if case.layout == "contiguous":
        sharding.cuts = _cuts(shape[-1] if not case.varlen else shape[0], world_size, gen)
    elif case.varlen:
        padded = [(n + parts - 1) // parts * parts for n in lengths]
        if case.variant != "late_tie":
            padded[0] += parts  # whole slices of padding
        sharding.cu_seqlens_padded = cu_seqlens_of(padded, inputs["cu_seqlens"].dtype)
        starts = sharding.cu_seqlens_padded[:-1].tolist()
        sharding.real_rows = torch.tensor(
            [s + i for s, n in zip(starts, lengths, strict=True) for i in range(n)], dtype=torch.long
        )
    if case.variant == "late_tie":
        size = 2 if case.varlen else shape[1] // parts  # the slice size of sequence 0
        first_row = inputs["x"] if case.varlen else inputs["x"][0]
        first_row[size] = first_row[(parts - 1) * size] = 10.0
    return inputs, sharding


def _reference_fn(case: Case, inputs):
    op, mask, cu = getattr(reference, case.op), inputs["mask"], inputs["cu_seqlens"]
    if case.op in ("attention_pool", "query_attention_pool"):
        return lambda x, other: op(x, other, mask, cu_seqlens=cu)
    return lambda x: op(x, mask, cu_seqlens=cu)


# --- running a case -------------------------------------------------------------------------------


def _same_bytes_everywhere(t: torch.Tensor, what: str) -> None:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what} differs across ranks"


def run_case(case: Case, rank: int, world_size: int, seed: int) -> None:
    inputs, sharding = global_inputs(case, world_size, seed)
    attention = case.op in ("attention_pool", "query_attention_pool")
    x = sharding.local(inputs["x"], rank, fill=float("nan")).requires_grad_()  # padding: never read
    leaves = [x]
    kwargs = dict(cu_seqlens=inputs["cu_seqlens"], layout=case.layout)
    if case.layout == "zigzag" and case.varlen:
        kwargs["cu_seqlens_padded"] = sharding.cu_seqlens_padded
    if case.op not in ("first_token", "last_token"):
        kwargs["backend"] = case.backend
    mask = inputs["mask"]
    if mask is not None:
        mask = sharding.local(mask, rank, fill=float("nan") if mask.is_floating_point() else False)
    if case.op == "attention_pool":
        leaves.append(sharding.local(inputs["scores"], rank, fill=float("nan")).requires_grad_())
    if case.op == "query_attention_pool":
        leaves.append(inputs["query"].clone().requires_grad_())
    fn = getattr(fd, case.op)
    ref_fn = _reference_fn(case, inputs)
    ref_leaves = [inputs["x"].detach().requires_grad_()] + (
        [inputs["scores" if case.op == "attention_pool" else "query"].detach().requires_grad_()]
        if attention
        else []
    )
    ref_out = ref_fn(*ref_leaves)
    grad = torch.randn(ref_out.shape, generator=make_generator(seed + 1)).to(case.dtype)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad)

    runs = []
    for _ in range(2):
        out = fn(*leaves[:1], *leaves[1:], mask, **kwargs)
        runs.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (out_again, grads_again) = runs
    assert out.dtype == case.dtype and out.shape == ref_out.shape, f"output {out.dtype} {tuple(out.shape)}"
    for first, second in zip((out, *grads), (out_again, *grads_again), strict=True):
        assert torch.equal(first.view(torch.uint8), second.view(torch.uint8)), "not bitwise deterministic"
    _same_bytes_everywhere(out, "the output")

    if case.op in SELECTIONS:
        assert_close(out, ref_out, exact=True)
    elif case.op == "masked_mean_max":
        assert_close(out[:, :HIDDEN], ref_out[:, :HIDDEN])
        assert_close(out[:, HIDDEN:], ref_out[:, HIDDEN:], exact=True)
    else:
        assert_close(out, ref_out)

    expected_dx = sharding.local(ref_grads[0], rank)
    if attention:
        exact_leaves = [t.detach().double().requires_grad_() for t in ref_leaves]
        exact_dx, exact_other = torch.autograd.grad(ref_fn(*exact_leaves), exact_leaves, grad.double())
        assert_within_reference_error(grads[0], expected_dx, sharding.local(exact_dx, rank), case.dtype)
        if case.op == "attention_pool":
            expected_other, exact_local = (sharding.local(t, rank) for t in (ref_grads[1], exact_other))
            assert_within_reference_error(grads[1], expected_other, exact_local, case.dtype)
        else:  # a replicated query: the ranks' contributions sum to the full gradient
            dquery = grads[1].double()
            dist.all_reduce(dquery)
            assert_within_reference_error(dquery, ref_grads[1], exact_other, case.dtype)
    elif case.op in SELECTIONS:
        assert_close(grads[0], expected_dx, exact=True)
    else:
        assert_close(grads[0], expected_dx)


# --- bad inputs: the same error on every rank -----------------------------------------------------


def bad_inputs(rank: int, world_size: int):
    """(name, call, error type, text the message must contain)."""
    parts = 2 * world_size
    cu = cu_seqlens_of([3, 5])
    x = torch.randn(2, 4, HIDDEN)
    return [
        (
            "zigzag L not divisible by 2W",
            lambda: fd.masked_mean(torch.randn(2, 3, HIDDEN), layout="zigzag"),
            ValueError,
            "x: layout='zigzag'",
        ),
        (
            "zigzag unequal local lengths",
            lambda: fd.masked_max(torch.randn(2, 2 + 2 * (rank == 0), HIDDEN), layout="zigzag"),
            ValueError,
            "x:",
        ),
        (
            "zigzag padded length not divisible",
            lambda: fd.masked_mean(
                torch.randn(4, HIDDEN), cu_seqlens=cu, cu_seqlens_padded=cu, layout="zigzag"
            ),
            ValueError,
            "cu_seqlens_padded",
        ),
        (
            "zigzag real lengths not divisible, no cu_seqlens_padded",
            lambda: fd.masked_mean(torch.randn(4, HIDDEN), cu_seqlens=cu, layout="zigzag"),
            ValueError,
            "cu_seqlens_padded (default: cu_seqlens)",
        ),
        (
            "zigzag local tokens wrong",
            lambda: fd.last_token(torch.randn(1, HIDDEN), cu_seqlens=cu_seqlens_of([parts]), layout="zigzag"),
            ValueError,
            "x:",
        ),
        (
            "local lengths do not add up",
            lambda: fd.masked_mean(torch.randn(3, HIDDEN), cu_seqlens=cu),
            ValueError,
            "add up",
        ),
        (
            "mask with varlen on rank 0",
            lambda: fd.masked_max(
                torch.randn(4, HIDDEN),
                torch.ones(4, dtype=torch.bool) if rank == 0 else None,
                cu_seqlens=cu_seqlens_of([4 * world_size]),
            ),
            ValueError,
            "mask",
        ),
        (
            "different layouts",
            lambda: fd.attention_pool(x, torch.randn(2, 4), layout="zigzag" if rank == 1 else "contiguous"),
            ValueError,
            "layout",
        ),
        (
            "unknown layout on one rank",
            lambda: fd.first_token(x, layout="ring" if rank == world_size - 1 else "contiguous"),
            ValueError,
            "layout",
        ),
        (
            "different cu_seqlens",
            lambda: fd.masked_mean(
                torch.randn(4, HIDDEN), cu_seqlens=cu_seqlens_of([4 * world_size - rank, rank])
            ),
            ValueError,
            "cu_seqlens",
        ),
        (
            "integer x on one rank",
            lambda: fd.masked_mean(x.long() if rank == 0 else x),
            TypeError,
            "x must be",
        ),
        (
            "cu_seqlens that differ inside, same total",
            lambda: fd.masked_mean(
                torch.randn(4, HIDDEN),
                cu_seqlens=torch.tensor([0, 1 + (rank == 0), 4 * world_size - 2, 4 * world_size]),
            ),
            ValueError,
            "cu_seqlens must be the same on every rank",
        ),
        (
            "cu_seqlens differing by the int64 minimum",  # what a MIN through negation would miss
            lambda: fd.masked_mean(
                torch.randn(torch.tensor_split(torch.arange(8), world_size)[rank].numel(), HIDDEN),
                cu_seqlens=torch.tensor([0, -(2**63) if rank == 0 else 0, 8]),
            ),
            ValueError,
            "cu_seqlens must be the same on every rank",
        ),
        (
            "cu_seqlens_padded that differ inside, one rank's malformed",
            lambda: fd.masked_mean(
                torch.randn(4, HIDDEN),
                cu_seqlens=cu_seqlens_of([1, 1]),
                cu_seqlens_padded=torch.tensor([0, (1 if rank == 0 else 3) * parts, 2 * parts]),
                layout="zigzag",
            ),
            ValueError,
            "cu_seqlens_padded must be the same on every rank",
        ),
        ("different ops", lambda: (fd.masked_mean if rank else fd.masked_max)(x), ValueError, "same call"),
        (
            "query heads must divide H",
            lambda: fd.query_attention_pool(x, torch.randn(3, 3)),
            ValueError,
            "query",
        ),
        *offsets_that_fingerprints_confuse(rank, world_size),
    ]


# Differ, yet sum (i + 1) c_i and sum (i + 1)^2 c_i agree (280 and 1400): even and odd ranks get one each.
TWINS = ([0, 4, 8, 12, 16, 20], [0, 5, 5, 15, 15, 20])


def offsets_that_fingerprints_confuse(rank: int, world_size: int):
    """The TWINS as cu_seqlens and as cu_seqlens_padded, on every backend that runs here."""
    parts, twin = 2 * world_size, TWINS[rank % 2]
    local_tokens = torch.tensor_split(torch.arange(20), world_size)[rank].numel()
    backends = [b for b in ("cpu", "torch", "triton") if b in available_backends()]
    return [
        *(
            (
                f"cu_seqlens {TWINS[0]} vs {TWINS[1]}, {backend}",
                lambda backend=backend: fd.masked_mean(
                    torch.randn(local_tokens, HIDDEN), cu_seqlens=torch.tensor(twin), backend=backend
                ),
                ValueError,
                "cu_seqlens must be the same on every rank",
            )
            for backend in backends
        ),
        *(
            (
                f"cu_seqlens_padded 2W * {TWINS[0]} vs 2W * {TWINS[1]}, {backend}",
                lambda backend=backend: fd.masked_max(
                    torch.randn(20 * parts // world_size, HIDDEN),
                    cu_seqlens=cu_seqlens_of([1, 0, 0, 0, 0]),
                    cu_seqlens_padded=torch.tensor([parts * c for c in twin]),
                    layout="zigzag",
                    backend=backend,
                ),
                ValueError,
                "cu_seqlens_padded must be the same on every rank",
            )
            for backend in backends
        ),
    ]


def empty_shapes(rank: int, world_size: int) -> list[tuple[str, object, tuple[int, ...]]]:
    """(name, call, expected output shape): zero-size outputs, as on one device."""
    cu_empty = torch.zeros(1, dtype=torch.int32)
    return [
        ("B = 0 padded", lambda: fd.masked_mean(torch.randn(0, 2, HIDDEN)), (0, HIDDEN)),
        ("B = 0 varlen", lambda: fd.masked_max(torch.randn(0, HIDDEN), cu_seqlens=cu_empty), (0, HIDDEN)),
        ("H = 0 max", lambda: fd.masked_max(torch.randn(2, 3, 0)), (2, 0)),
        ("H = 0 mean_max", lambda: fd.masked_mean_max(torch.randn(2, 3, 0), layout="contiguous"), (2, 0)),
        (
            "H = 0 query attention",
            lambda: fd.query_attention_pool(torch.randn(2, 3, 0), torch.randn(0)),
            (2, 0),
        ),
        (
            "B = 0 attention",
            lambda: fd.attention_pool(torch.randn(0, 2, HIDDEN), torch.randn(0, 2)),
            (0, HIDDEN),
        ),
        ("B = 0 last token", lambda: fd.last_token(torch.randn(0, 2, HIDDEN)), (0, HIDDEN)),
    ]


def check_bad_input(call, error_type, text) -> None:
    try:
        call()
    except error_type as error:
        assert text in str(error), f"message {str(error)!r} lacks {text!r}"
        return
    except Exception as error:  # noqa: BLE001 - reported as the failure
        raise AssertionError(
            f"raised {type(error).__name__}: {error}, expected {error_type.__name__}"
        ) from None
    raise AssertionError(f"did not raise {error_type.__name__}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world_size = args.rank, args.world_size
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    failures, started, status = [], time.perf_counter(), 0
    try:
        for name, call, error_type, text in bad_inputs(rank, world_size):
            try:
                check_bad_input(call, error_type, text)
            except AssertionError as error:
                failures.append(f"bad input {name}: {error}")
        for name, call, shape in empty_shapes(rank, world_size):
            try:
                out = call()
                assert tuple(out.shape) == shape, f"shape {tuple(out.shape)}, expected {shape}"
            except Exception as error:  # noqa: BLE001 - reported as the failure
                failures.append(f"empty shape {name}: {type(error).__name__}: {error}")
        all_cases = cases(world_size)
        for seed, case in enumerate(all_cases):
            try:
                run_case(case, rank, world_size, seed)
            except AssertionError as error:
                failures.append(f"{case.name} (seed {seed}): {error}")
    except Exception:  # noqa: BLE001 - an unexpected error ends this rank; the others time out
        failures.append(traceback.format_exc())
        status = 1
    result = dict(
        rank=rank, failures=failures, seconds=time.perf_counter() - started, cases=len(cases(world_size))
    )
    with open(args.out, "w") as f:
        json.dump(result, f)
    if status == 0:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
