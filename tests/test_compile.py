"""The fused ops under torch.compile: no graph break, no recompile as shapes change, opcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED, assert_close, cu_seqlens_of

import fused_pool
from fused_pool.ops import MAX, MEAN, MEAN_MAX, kernels

OPS = ["masked_mean", "masked_max", "masked_mean_max"]


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_fullgraph_dynamic_matches_eager_without_recompiling(op, backend, device):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    compiled_padded = torch.compile(lambda x, m: fn(x, m, backend=backend), fullgraph=True, dynamic=True)
    compiled_varlen = torch.compile(
        lambda x, cu: fn(x, cu_seqlens=cu, backend=backend), fullgraph=True, dynamic=True
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(2, 9), (3, 17), (5, 4)]:
            x = torch.randn(batch, length, 12, device=device, requires_grad=True)
            mask = torch.rand(batch, length, device=device) > 0.3
            expected = fn(x, mask, backend=backend)
            (expected_dx,) = torch.autograd.grad(expected.sum(), x)
            out = compiled_padded(x, mask)
            (dx,) = torch.autograd.grad(out.sum(), x)
            assert_close(out, expected)
            assert_close(dx, expected_dx)

            lengths = list(range(2, 2 + batch))
            tokens = torch.randn(sum(lengths), 12, device=device)
            cu_seqlens = cu_seqlens_of(lengths, device=device)
            assert_close(compiled_varlen(tokens, cu_seqlens), fn(tokens, cu_seqlens=cu_seqlens, backend=backend))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_opcheck(mode, backend, device):
    op = kernels(backend, "pool").forward_op
    x = torch.randn(3, 10, 8, device=device, requires_grad=True)
    mask = torch.rand(3, 10, device=device) > 0.3
    for args in [
        (x, None, None, None, mode),
        (x, mask, None, None, mode),
        (x, mask.float(), None, None, mode),
        (x[0], None, cu_seqlens_of([4, 0, 6], device=device), None, mode),
        (x[0], None, cu_seqlens_of([4, 0, 6], torch.int64, device=device), 6, mode),
    ]:
        torch.library.opcheck(op, args)
