"""The pool forward's partial-state mode (mode | STATES) on every backend: what
fused_pool.distributed exchanges between ranks (their combine: distributed/test_distributed.py).

With STATES a pool forward writes, in the accumulation dtype, the sum of w x (not divided by the
sum of weights) and the maximum with its first index, so that pieces of a sequence combine exactly:
float32 sums, not means rebuilt from an output rounded to x's dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import cu_seqlens_of, make_generator, make_mask, poisoned_allocations, stable_seed

from fused_pool.backends import unavailable_reason
from fused_pool.contract import MAX, MEAN, MEAN_MAX, STATES, accumulation_dtype
from fused_pool.ops import kernels
from fused_pool.partials import pool_states

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [
    pytest.param(backend, device, id=f"{backend}-{device}")
    for backend in ("triton", "cpu", "cuda", "torch")
    for device in DEVICES
    if unavailable_reason(backend, torch.device(device)) is None
]
MODES = [pytest.param(m, id=n) for m, n in ((MEAN, "mean"), (MAX, "max"), (MEAN_MAX, "mean_max"))]


def _exact_states(x: torch.Tensor, weights: torch.Tensor, lengths: list[int]):
    """float64 sum of w x, sum of w, max and first argmax (index within the sequence) per sequence."""
    sums, dens, maxima, argmaxes = [], [], [], []
    for xs, ws in zip(x.double().split(lengths), weights.double().split(lengths), strict=True):
        sums.append((xs * ws[:, None]).sum(0))
        dens.append(ws.sum())
        kept = xs[ws != 0]
        if len(kept):
            maxima.append(kept.max(0).values)
            positions = torch.nonzero(ws != 0).squeeze(1)
            argmaxes.append(positions[kept.argmax(0)].int())  # torch.argmax: the first maximum
        else:
            maxima.append(torch.zeros(x.shape[-1], dtype=torch.float64))
            argmaxes.append(torch.full((x.shape[-1],), -1, dtype=torch.int32))
    return torch.stack(sums), torch.stack(dens), torch.stack(maxima), torch.stack(argmaxes)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("length", [9, 3000], ids=["short", "split"])
def test_states_forward_matches_exact_sums(backend, device, mode, dtype, layout, length):
    gen = make_generator(stable_seed("states", backend, mode, dtype, layout, length))
    batch, hidden = 3, 12
    x = torch.randn(batch, length, hidden, generator=gen).to(dtype)
    if layout == "padded":
        mask = make_mask("float" if mode == MEAN else "bool", batch, length, gen)  # empty, one token
        weights, lengths, args = mask.reshape(-1), [length] * batch, (x, mask, None, None)
        x_rows = x.reshape(-1, hidden)
    else:
        lengths = [length, 0, 1 + length // 3]
        x_rows = torch.randn(sum(lengths), hidden, generator=gen).to(dtype)
        weights = torch.ones(sum(lengths))
        args = (x_rows, None, cu_seqlens_of(lengths, torch.int64), None)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    with poisoned_allocations():
        out, den, argmax = kernels(backend, "pool").forward(*args, mode | STATES)
    acc = accumulation_dtype(dtype)
    assert out.dtype == acc and out.shape == (batch, hidden * (2 if mode == MEAN_MAX else 1))
    mean, maximum = pool_states((out.cpu(), den.cpu(), argmax.cpu()), mode)
    sums, dens, maxima, argmaxes = _exact_states(x_rows, weights, lengths)
    tolerance = dict(atol=1e-9, rtol=1e-9) if acc == torch.float64 else dict(atol=2e-5 * length, rtol=1e-5)
    if mode & MEAN:
        torch.testing.assert_close(mean.total.double(), sums, **tolerance)
        torch.testing.assert_close(mean.den.double(), dens, **tolerance)
    if mode & MAX:
        assert torch.equal(maximum.value.double(), maxima)  # a selected x, exactly
        assert torch.equal(maximum.index, argmaxes)
