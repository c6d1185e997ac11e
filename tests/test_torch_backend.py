"""The "torch" backend (fused_pool.torch_kernels, plain PyTorch kernels behind the same op layer as
the fused backends) against the reference: outputs and gradients on fresh random inputs, opcheck,
torch.compile. tests/test_pool.py and tests/test_attention.py hold the checks reused here."""

from __future__ import annotations

import pytest
import torch
from helpers import cu_seqlens_of, make_generator, make_mask, poison_padding
from test_attention import check_attention, make_query, make_scores
from test_pool import check_op

import fused_pool
from fused_pool.contract import MAX, MEAN, MEAN_MAX
from fused_pool.ops import kernels

POOL_OPS = ["masked_mean", "masked_max", "masked_mean_max"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "left_padded"])
@pytest.mark.parametrize("op", POOL_OPS)
def test_pool_padded(op, mask_kind, dtype):
    gen = make_generator(len(op) + len(mask_kind))
    x = torch.randn(4, 23, 12, generator=gen).to(dtype)
    mask = make_mask(mask_kind, 4, 23, gen)
    check_op(op, "torch", poison_padding(x, mask), mask)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("op", POOL_OPS)
def test_pool_varlen_and_ties(op, index_dtype):
    gen = make_generator(3)
    lengths = [5, 0, 17, 1]
    x = torch.randint(-2, 3, (sum(lengths), 10), generator=gen).float()  # ties: first position wins
    check_op(op, "torch", x, cu_seqlens=cu_seqlens_of(lengths, index_dtype))
    if op == "masked_mean":  # per-token weights (T,)
        weights = torch.rand(sum(lengths), generator=gen) + 0.25
        check_op(
            op,
            "torch",
            torch.randn(sum(lengths), 10, generator=gen),
            weights,
            cu_seqlens=cu_seqlens_of(lengths),
        )


def test_pool_nan_and_empty():
    x = torch.randn(3, 6, 4)
    x[0, 2, 0] = x[0, 4, 0] = float("nan")
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    out, dx = check_op("masked_mean_max", "torch", x, mask)
    assert out[0, 4].isnan() and not out[1].any() and not dx[1].any()
    check_op("masked_max", "torch", torch.randn(2, 0, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "left_padded"])
def test_attention_padded(mask_kind, num_heads, dtype):
    gen = make_generator(num_heads + len(mask_kind))
    x = torch.randn(4, 19, 16, generator=gen).to(dtype)
    mask = make_mask(mask_kind, 4, 19, gen)
    scores = make_scores((4, 19), num_heads, dtype, "cpu", gen)
    scores[0, :5] = float("-inf")
    check_attention("attention_pool", "torch", poison_padding(x, mask), scores, mask)
    check_attention(
        "query_attention_pool",
        "torch",
        poison_padding(x, mask),
        make_query(16, num_heads, dtype, "cpu", gen),
        mask,
    )


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_varlen(num_heads):
    gen = make_generator(11)
    lengths = [7, 0, 12, 1]
    x = torch.randn(sum(lengths), 16, generator=gen)
    cu_seqlens = cu_seqlens_of(lengths, torch.int64)
    scores = make_scores((sum(lengths),), num_heads, torch.float32, "cpu", gen)
    check_attention("attention_pool", "torch", x, scores, cu_seqlens=cu_seqlens)
    check_attention(
        "query_attention_pool",
        "torch",
        x,
        make_query(16, num_heads, torch.float32, "cpu", gen),
        cu_seqlens=cu_seqlens,
    )


def test_varlen_token_mask_is_never_read():
    """The distributed zigzag layout passes a per-token (T,) mask to the varlen kernels."""
    gen = make_generator(12)
    x = torch.randn(9, 8, generator=gen)
    keep = torch.rand(9, generator=gen) > 0.4
    cu_seqlens = cu_seqlens_of([4, 5])
    scores = torch.randn(9, 2, generator=gen)
    poisoned = x.masked_fill(~keep[:, None], float("nan"))
    out, stats = kernels("torch", "attention").forward(poisoned, scores, keep, cu_seqlens, None)
    expected = fused_pool.reference.attention_pool(
        x[keep], scores[keep], cu_seqlens=cu_seqlens_of([int(keep[:4].sum()), int(keep[4:].sum())])
    )
    torch.testing.assert_close(out, expected)
    pooled, den, argmax = kernels("torch", "pool").forward(poisoned, keep, cu_seqlens, None, MEAN_MAX)
    assert pooled.isfinite().all()


@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_opcheck(mode):
    op = kernels("torch", "pool").forward_op
    x = torch.randn(3, 10, 8, requires_grad=True)
    mask = torch.rand(3, 10) > 0.3
    for args in [(x, mask, None, None, mode), (x[0], None, cu_seqlens_of([4, 0, 6]), None, mode)]:
        torch.library.opcheck(op, args)
    query = torch.randn(2, 4, requires_grad=True)
    torch.library.opcheck(kernels("torch", "query_attention").forward_op, (x, query, mask, None, None, 0.5))


@pytest.mark.parametrize("op", ["masked_mean_max", "attention_pool"])
def test_compile_fullgraph_dynamic(op):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    if op == "attention_pool":
        call = lambda x, m: fn(x, x[..., :2].detach().sum(-1), m, backend="torch")
    else:
        call = lambda x, m: fn(x, m, backend="torch")
    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 9), (4, 17), (6, 5)]:
            x = torch.randn(batch, length, 12, requires_grad=True)
            mask = torch.rand(batch, length) > 0.3
            out = compiled(x, mask)
            torch.testing.assert_close(out, call(x, mask))
            (dx,) = torch.autograd.grad(out.sum(), x)
            (expected,) = torch.autograd.grad(call(x, mask).sum(), x)
            torch.testing.assert_close(dx, expected)
