"""fused_pool.first_token / last_token against the reference: left and right padding, varlen,
empty sequences, int32 / int64 cu_seqlens, non-contiguous inputs, gradients to the chosen token
only (argument checks: test_arguments.py; torch.compile: test_compile.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens_of, make_generator, make_mask, outputs_and_grads, poison_padding

import fused_pool
from fused_pool import reference

OPS = ["first_token", "last_token"]


def check(op, x, mask=None, **kwargs):
    """Output and dx equal the reference's exactly (a gather: no arithmetic)."""
    grad = torch.randn(reference.first_token(x, mask, **kwargs).shape, generator=make_generator(1))
    ref_out, (ref_dx,) = outputs_and_grads(lambda t: getattr(reference, op)(t, mask, **kwargs), [x], grad)
    out, (dx,) = outputs_and_grads(lambda t: getattr(fused_pool, op)(t, mask, **kwargs), [x], grad)
    assert out.shape == ref_out.shape and out.dtype == x.dtype
    assert_close(out, ref_out, exact=True)
    assert_close(dx, ref_dx, exact=True)
    return out, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "float", "left_padded"])
@pytest.mark.parametrize("op", OPS)
def test_padded(op, mask_kind, dtype):
    gen = make_generator(len(mask_kind))
    x = torch.randn(4, 9, 6, generator=gen).to(dtype)
    mask = make_mask(mask_kind, 4, 9, gen)
    out, dx = check(op, poison_padding(x, mask), mask)
    if mask is not None:  # make_mask empties sequence 1
        assert not out[1].any() and not dx[1].any()
    assert (dx != 0).sum() <= out.numel()  # the gradient reaches one token per sequence


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("lengths", [[3, 0, 5, 1], [0, 0], [7]], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_varlen(op, lengths, index_dtype):
    x = torch.randn(sum(lengths), 5, generator=make_generator(sum(lengths)))
    cu_seqlens = cu_seqlens_of(lengths, index_dtype)
    out, _ = check(op, x, cu_seqlens=cu_seqlens)
    assert not out[torch.tensor(lengths) == 0].any()
    # (1, T, H) from HF's flattening collator
    assert torch.equal(getattr(fused_pool, op)(x[None], cu_seqlens=cu_seqlens), out)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_and_degenerate(op):
    gen = make_generator(3)
    base = torch.randn(9, 5, 4, generator=gen)
    x = base.transpose(0, 1)  # (5, 9, 4), batch stride 4
    mask = (torch.rand(9, 5, generator=gen) > 0.5).t()
    check(op, x, mask)
    check(op, torch.randn(3, 0, 4))  # no positions: every sequence empty
    check(op, torch.randn(0, 4), cu_seqlens=cu_seqlens_of([0, 0]))
    tokens = torch.randn(12, 8, generator=gen)[:, ::2]  # column stride 2
    check(op, tokens, cu_seqlens=cu_seqlens_of([5, 7]))
