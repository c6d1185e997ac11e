"""fused_pool.distributed: groups of 2, 3 and 4 gloo processes on CPU run every op against the
single-device reference (tests/distributed/distributed_cases.py); one-rank gloo and NCCL groups
(tests/distributed/distributed_one_rank.py); in this process, the partial states and their combine, and
`shard`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers import FUSED, assert_close, cu_seqlens_of, make_generator

import fused_pool
import fused_pool.distributed as fd
from fused_pool import partials
from fused_pool.contract import MAX, MEAN, MEAN_MAX, STATES
from fused_pool.ops import kernels

WORKER = Path(__file__).with_name("distributed_cases.py")
TESTS = Path(__file__).resolve().parents[1]  # tests/: the workers import helpers from there
GROUP_TIMEOUT_S = 300  # the whole group; each collective also times out after 60 s


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_group_matches_single_device(world_size, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    init_file = tmp_path / "init"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--rank",
                str(rank),
                "--world-size",
                str(world_size),
                "--init-file",
                str(init_file),
                "--out",
                str(tmp_path / f"rank{rank}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(world_size)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=GROUP_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"the {world_size} ranks did not finish in {GROUP_TIMEOUT_S} s (a hang?)")
    failures = []
    for rank, (worker, log) in enumerate(zip(workers, logs, strict=True)):
        result_file = tmp_path / f"rank{rank}.json"
        if not result_file.exists():
            failures.append(f"rank {rank} exited with {worker.returncode} and no result:\n{log[-3000:]}")
            continue
        result = json.loads(result_file.read_text())
        failures += [f"rank {rank}: {failure}" for failure in result["failures"]]
        if worker.returncode:
            failures.append(f"rank {rank} exited with {worker.returncode}:\n{log[-3000:]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])


@pytest.mark.parametrize(
    "dist_backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(
                not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
                reason="needs a CUDA GPU and NCCL",
            ),
        ),
    ],
)
def test_one_rank_group_through_each_collective_backend(dist_backend, tmp_path):
    """NCCL needs a GPU per rank: a one-rank group is what a one-GPU machine can check."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if dist_backend == "gloo":
        env.setdefault("TRITON_INTERPRET", "1")
    worker = Path(__file__).with_name("distributed_one_rank.py")
    command = [sys.executable, str(worker), "--dist-backend", dist_backend]
    command += ["--init-file", str(tmp_path / "init")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=GROUP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# --- partial states: pieces of a sequence combine into the whole --------------------------------

CPU_BACKENDS = [p for p in FUSED if p.values[1] == "cpu"] + [pytest.param("torch", "cpu", id="torch-cpu")]


def _stacked(state_type, states):
    """Per-chunk states -> one state whose leading axis is the chunk, in position order."""
    return state_type(*(torch.stack(fields) for fields in zip(*states, strict=True)))


def _chunks(length: int, gen) -> list[int]:
    """Cut points of [0, length) into 4 uneven chunks, some of them empty."""
    inner = sorted(torch.randint(0, length + 1, (3,), generator=gen).tolist())
    return [0, *inner, length]


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_pool_chunks_combine_into_the_whole(mode, backend, device):
    gen = make_generator(mode)
    x = torch.randint(-2, 3, (3, 23, 6), generator=gen).float()  # ties across chunks
    x += torch.rand(x.shape, generator=gen) * (mode == MEAN)
    mask = torch.rand(3, 23, generator=gen) > 0.3
    mask[1] = False
    pool = kernels(backend, "pool")
    cuts = _chunks(23, gen)
    means, maxima = [], []
    for start, end in pairwise(cuts):
        mean, maximum = partials.pool_states(
            pool.forward(x[:, start:end], mask[:, start:end], None, None, mode | STATES), mode
        )
        means.append(mean)
        if maximum is not None:  # the state's index counts from the chunk's start
            maximum = partials.MaxState(
                maximum.value, torch.where(maximum.index >= 0, maximum.index + start, -1)
            )
        maxima.append(maximum)
    whole_out, whole_den, whole_argmax = pool.forward(x, mask, None, None, mode)
    hidden = x.shape[-1]
    if mode & MEAN:
        combined = partials.combine_mean(_stacked(partials.MeanState, means))
        assert_close(partials.mean_of(combined), whole_out[:, :hidden])
        assert_close(combined.den, whole_den)
    if mode & MAX:
        best, piece = partials.combine_max(_stacked(partials.MaxState, maxima))
        assert torch.equal(best.value, whole_out[:, -hidden:]) and torch.equal(best.index, whole_argmax)
        assert ((piece >= 0) == (whole_argmax >= 0)).all()


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_softmax_chunks_combine_into_the_whole(backend, device):
    gen = make_generator(5)
    x = torch.randn(3, 19, 8, generator=gen)
    scores = torch.randn(3, 19, 2, generator=gen) * 3
    scores[0, :10] = float("-inf")  # whole chunks of -inf
    scores[1] = float("-inf")  # an empty sequence
    attention = kernels(backend, "attention")
    cuts = _chunks(19, gen)
    states = [
        partials.SoftmaxState(*attention.forward(x[:, a:b], scores[:, a:b], None, None, None))
        for a, b in pairwise(cuts)
    ]
    combined = partials.combine_softmax(_stacked(partials.SoftmaxState, states))
    out, stats = attention.forward(x, scores, None, None, None)
    assert_close(combined.out, out)
    nonempty = stats[..., 1] > 0
    assert_close(combined.stats[nonempty], stats[nonempty])
    assert (combined.stats[~nonempty][..., 1] == 0).all()


def test_token_chunks_combine_into_the_whole():
    gen = make_generator(6)
    x = torch.randn(4, 15, 5, generator=gen)
    mask = torch.rand(4, 15, generator=gen) > 0.6
    mask[0] = False
    cuts = _chunks(15, gen)
    for which, whole in (("first", fused_pool.first_token), ("last", fused_pool.last_token)):
        states = []
        for a, b in pairwise(cuts):
            position, found = fused_pool.tokens.token_positions(x[:, a:b], mask[:, a:b], None, which)
            states.append(
                partials.TokenState(fused_pool.tokens.gather_tokens(x[:, a:b], position, found), found)
            )
        best, _ = partials.combine_tokens(_stacked(partials.TokenState, states), which)
        assert torch.equal(best.row, whole(x, mask))


# --- shard ---------------------------------------------------------------------------------------


def test_shard_layouts_cover_the_axis_once():
    t = torch.arange(2 * 24).view(2, 24)
    for layout in ("contiguous", "zigzag"):
        pieces = [fd.shard(t, rank=r, world_size=3, layout=layout, dim=1) for r in range(3)]
        assert sorted(torch.cat(pieces, 1)[0].tolist()) == list(range(24))
    assert fd.shard(t, rank=0, world_size=3, layout="zigzag", dim=1)[0].tolist() == [
        0,
        1,
        2,
        3,
        20,
        21,
        22,
        23,
    ]
    padded = cu_seqlens_of([8, 0, 4])
    tokens = torch.arange(12)
    assert fd.shard(
        tokens, rank=1, world_size=2, layout="zigzag", dim=0, cu_seqlens_padded=padded
    ).tolist() == [
        2,
        3,
        4,
        5,
        9,
        10,
    ]


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        (dict(rank=2, world_size=2, layout="contiguous", dim=1), ValueError, "rank"),
        (dict(rank=0, world_size=2, layout="ring", dim=1), ValueError, "layout"),
        (dict(rank=0, world_size=4, layout="zigzag", dim=1), ValueError, "divisible"),
        (
            dict(rank=0, world_size=2, layout="zigzag", dim=0, cu_seqlens_padded=cu_seqlens_of([3, 3])),
            ValueError,
            "cu_seqlens_padded",
        ),
        (
            dict(rank=0, world_size=2, layout="zigzag", dim=0, cu_seqlens_padded=torch.tensor([4, 8, 12])),
            ValueError,
            "start at 0",
        ),
        (dict(rank=0, world_size=2, layout="contiguous", dim=5), ValueError, "dim"),
        (dict(rank="0", world_size=2, layout="contiguous", dim=1), TypeError, "rank"),
    ],
)
def test_shard_rejects_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        fd.shard(torch.zeros(6, 12), **kwargs)


def test_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.masked_mean(torch.randn(2, 4, 8))
