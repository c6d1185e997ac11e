"""The fused ops under torch.compile: no graph break, no recompile as shapes change, opcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED, assert_close, cu_seqlens_of

import fused_pool
from fused_pool.ops import MAX, MEAN, MEAN_MAX, kernels

OPS = ["masked_mean", "masked_max", "masked_mean_max"]
ATTENTION_OPS = ["attention_pool", "query_attention_pool"]


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


def _second_input(op, token_shape, hidden, device):
    if op == "attention_pool":
        return torch.randn(*token_shape, 2, device=device, requires_grad=True)
    return torch.randn(2, hidden // 2, device=device, requires_grad=True)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_attention_fullgraph_dynamic_matches_eager_without_recompiling(op, backend, device):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, o, m: fn(x, o, m, backend=backend), fullgraph=True, dynamic=True)
    # Batch sizes differ from nh = 2: Dynamo's duck sizing gives equal sizes one symbol, so a
    # first call with B == nh would recompile when B changes.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 9), (4, 17), (6, 5)]:
            x = torch.randn(batch, length, 12, device=device, requires_grad=True)
            other = _second_input(op, (batch, length), 12, device)
            mask = torch.rand(batch, length, device=device) > 0.3
            expected = fn(x, other, mask, backend=backend)
            expected_grads = torch.autograd.grad(expected.sum(), (x, other))
            out = compiled(x, other, mask)
            grads = torch.autograd.grad(out.sum(), (x, other))
            assert_close(out, expected)
            for actual, wanted in zip(grads, expected_grads):
                assert_close(actual, wanted)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("kind", ["attention", "query_attention"])
def test_attention_opcheck(kind, backend, device):
    op = kernels(backend, kind).forward_op
    x = torch.randn(3, 10, 8, device=device, requires_grad=True)
    mask = torch.rand(3, 10, device=device) > 0.3
    cu_seqlens = cu_seqlens_of([4, 0, 6], device=device)
    if kind == "attention":
        other, tokens_other = torch.randn(3, 10, 2, device=device), torch.randn(10, 1, device=device)
        extra = ()
    else:
        other, tokens_other = torch.randn(2, 4, device=device), torch.randn(1, 8, device=device)
        extra = (0.5,)
    other.requires_grad_()
    for args in [
        (x, other, None, None, None, *extra),
        (x, other, mask, None, None, *extra),
        (x[0], tokens_other, None, cu_seqlens, 6, *extra),
    ]:
        torch.library.opcheck(op, args)
