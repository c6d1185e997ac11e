"""Fused attention_pool / query_attention_pool against the reference: outputs and the gradients
of x, scores and query, every layout, dtype, head count and fused backend, outputs poisoned."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    FUSED,
    assert_close,
    assert_within_reference_error,
    cu_seqlens_of,
    make_generator,
    make_mask,
    outputs_and_grads,
    poison_padding,
    random_like_output,
    stable_seed,
)

import fused_pool
from fused_pool import reference

# (B, L, H): L = 1, L not a multiple of any block, H not a power of two, a split sequence.
PADDED_SHAPES = [(1, 1, 4), (3, 37, 40), (3, 70, 1000), (3, 300, 64)]
MASKS = ["none", "bool", "int", "float", "left_padded"]
LENGTHS = [[5, 0, 17, 1], [300, 2, 0, 129]]
HEADS = [1, 4]


def make_scores(token_shape, num_heads, dtype, device, gen, scale=2.0):
    """Scores of one head as (B, L) / (T,), several as (..., nh)."""
    shape = token_shape if num_heads == 1 else (*token_shape, num_heads)
    return (torch.randn(shape, generator=gen) * scale).to(device, dtype)


def make_query(hidden, num_heads, dtype, device, gen):
    shape = (hidden,) if num_heads == 1 else (num_heads, hidden // num_heads)
    return torch.randn(shape, generator=gen).to(device, dtype)


def check_attention(op, backend, x, other, mask=None, seed=0, **kwargs):
    """Output and the gradients of x and of scores / query against the reference. Gradients are
    dot products over the head (ds = p (g.x - g.out)): they must be within twice the reference's
    own error against float64."""
    ref = lambda a, b: getattr(reference, op)(a, b, mask, **kwargs)
    fused = lambda a, b: getattr(fused_pool, op)(a, b, mask, backend=backend, **kwargs)
    grad = random_like_output(ref(x, other).shape, x.dtype, x.device, seed)
    ref_out, ref_grads = outputs_and_grads(ref, [x, other], grad)
    _, exact_grads = outputs_and_grads(ref, [x.double(), other.double()], grad.double())
    out, grads = outputs_and_grads(fused, [x, other], grad, poisoned=True)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == ref_out.shape
    assert_close(out, ref_out)
    for actual, expected, exact, source in zip(grads, ref_grads, exact_grads, (x, other), strict=True):
        assert actual.shape == source.shape and actual.dtype == source.dtype
        dtype = max(x.dtype, source.dtype, key=lambda d: torch.finfo(d).eps)
        assert_within_reference_error(actual, expected, exact, dtype)
    return out, grads


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_heads", HEADS)
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=str)
def test_attention_pool_padded(shape, num_heads, mask_kind, dtype, backend, device):
    gen = make_generator(stable_seed((shape, num_heads, mask_kind)))
    batch, length, hidden = shape
    x = torch.randn(shape, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, batch, length, gen)
    mask = mask if mask is None else mask.to(device)
    scores = make_scores((batch, length), num_heads, dtype, device, gen)
    check_attention("attention_pool", backend, poison_padding(x, mask), scores, mask)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_heads", HEADS)
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=str)
def test_query_attention_pool_padded(shape, num_heads, mask_kind, dtype, backend, device):
    gen = make_generator(stable_seed((shape, num_heads, mask_kind, "q")))
    batch, length, hidden = shape
    x = torch.randn(shape, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, batch, length, gen)
    mask = mask if mask is None else mask.to(device)
    query = make_query(hidden, num_heads, dtype, device, gen)
    check_attention("query_attention_pool", backend, poison_padding(x, mask), query, mask)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("num_heads", HEADS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_varlen(lengths, num_heads, index_dtype, dtype, backend, device):
    gen = make_generator(sum(lengths) + num_heads)
    x = torch.randn(sum(lengths), 48, generator=gen).to(device, dtype)
    cu_seqlens = cu_seqlens_of(lengths, index_dtype, device)
    scores = make_scores((sum(lengths),), num_heads, dtype, device, gen)
    query = make_query(48, num_heads, dtype, device, gen)
    for max_seqlen in (None, max(lengths)):
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        check_attention("attention_pool", backend, x, scores, **kwargs)
        check_attention("query_attention_pool", backend, x, query, **kwargs)
    # (1, T, H) from HF's flattening collator
    out = fused_pool.attention_pool(x[None], scores, cu_seqlens=cu_seqlens, backend=backend)
    assert_close(out, reference.attention_pool(x, scores, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("backend, device", FUSED)
def test_float32_scores_with_low_precision_x(backend, device):
    gen = make_generator(6)
    x = torch.randn(2, 50, 32, generator=gen).to(device, torch.bfloat16)
    scores = make_scores((2, 50), 2, torch.float32, device, gen)
    check_attention("attention_pool", backend, x, scores)
    query = make_query(32, 2, torch.float32, device, gen)
    check_attention("query_attention_pool", backend, x, query)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("num_heads", HEADS)
def test_empty_and_all_minus_inf_give_zero(num_heads, backend, device):
    gen = make_generator(7)
    x = torch.randn(3, 9, 8, generator=gen).to(device)
    scores = make_scores((3, 9), num_heads, torch.float32, device, gen)
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[0] = False  # no kept token
    scores[1] = float("-inf")  # every kept score -inf
    scores[2, :4] = float("-inf")  # partly -inf: only the rest count
    out, (dx, dscores) = check_attention("attention_pool", backend, poison_padding(x, mask), scores, mask)
    assert not out[:2].any() and not dx[:2].any() and not dscores[:2].any()
    assert out[2].isfinite().all() and not dx[2, :4].any()


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_huge_scores_do_not_overflow(dtype, backend, device):
    gen = make_generator(8)
    x = torch.randn(2, 40, 16, generator=gen).to(device, dtype)
    scores = (torch.randint(-1, 2, (2, 40, 2), generator=gen) * 1e4).to(device, dtype)
    out, grads = check_attention("attention_pool", backend, x, scores)
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)
    query = torch.full((16,), 300.0, device=device, dtype=dtype)  # scores ~ +-1e3
    out, grads = check_attention("query_attention_pool", backend, x, query)
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("backend, device", FUSED)
def test_long_sequence_takes_split_path(backend, device):
    from fused_pool.triton_kernels.split_plan import plan_split

    assert plan_split(1, 4096, 4096, 1, 64, torch.device(device)).split
    gen = make_generator(9)
    x = torch.randn(1, 4096, 32, generator=gen).to(device)
    mask = (torch.rand(1, 4096, generator=gen) > 0.5).to(device)
    scores = make_scores((1, 4096), 4, torch.float32, device, gen, scale=4.0)
    check_attention("attention_pool", backend, poison_padding(x, mask), scores, mask)
    check_attention("query_attention_pool", backend, x, make_query(32, 1, torch.float32, device, gen), mask)
    cu_seqlens = cu_seqlens_of([1000, 3000, 96], device=device)
    check_attention("attention_pool", backend, x[0], scores[0], cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend, device", FUSED)
def test_non_contiguous_inputs(backend, device):
    gen = make_generator(10)
    x = torch.randn(41, 3, 2 * 24, generator=gen).to(device).transpose(0, 1)[:, :, ::2]
    mask = (torch.rand(3, 2 * 41, generator=gen) > 0.4).to(device)[:, ::2]
    scores = torch.randn(2, 3, 41, generator=gen).to(device).permute(1, 2, 0)  # (B, L, nh) strided
    assert not (x.is_contiguous() or mask.is_contiguous() or scores.is_contiguous())
    check_attention("attention_pool", backend, poison_padding(x, mask), scores, mask)
    query = torch.randn(2, 24, generator=gen).to(device)[:, ::2]  # (nh=2, D=12), strided
    check_attention("query_attention_pool", backend, x, query, mask)


@pytest.mark.parametrize("backend, device", FUSED)
def test_scale_argument(backend, device):
    gen = make_generator(11)
    x = torch.randn(2, 20, 16, generator=gen).to(device)
    query = make_query(16, 2, torch.float32, device, gen)
    check_attention("query_attention_pool", backend, x, query, scale=0.3)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", ["attention_pool", "query_attention_pool"])
def test_bitwise_deterministic(op, backend, device):
    gen = make_generator(12)
    x = torch.randn(2, 1500, 40, generator=gen).to(device, torch.bfloat16)
    mask = (torch.rand(2, 1500, generator=gen) > 0.3).to(device)
    other = (
        make_scores((2, 1500), 4, torch.bfloat16, device, gen)
        if op == "attention_pool"
        else make_query(40, 4, torch.bfloat16, device, gen)
    )
    fn = lambda a, b: getattr(fused_pool, op)(a, b, mask, backend=backend)
    grad = random_like_output((2, 40), torch.bfloat16, device)
    first = outputs_and_grads(fn, [x, other], grad)
    second = outputs_and_grads(fn, [x, other], grad)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


@pytest.mark.parametrize("backend, device", FUSED)
def test_float64_gradcheck(backend, device):
    gen = make_generator(13)
    x = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[0, :3] = False
    scores = torch.randn(2, 7, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda a, b: fused_pool.attention_pool(a, b, mask, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, scores))
    query = torch.randn(2, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda a, b: fused_pool.query_attention_pool(a, b, mask, scale=0.5, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, query))
    cu_seqlens = cu_seqlens_of([3, 0, 11], device=device)
    tokens = torch.randn(14, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    token_scores = torch.randn(14, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda a, b: fused_pool.attention_pool(a, b, cu_seqlens=cu_seqlens, backend=backend)
    assert torch.autograd.gradcheck(fn, (tokens, token_scores))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("values", [[0, 5, 3, 8], [0, 40, 200], [-7, 3, 20]], ids=str)
def test_malformed_cu_seqlens_stay_in_bounds(backend, device, values):
    x = torch.randn(20, 8, device=device)
    cu_seqlens = torch.tensor(values, dtype=torch.int32, device=device)
    scores = torch.randn(20, 2, device=device)
    query = torch.randn(8, device=device)
    for fn, other in [(fused_pool.attention_pool, scores), (fused_pool.query_attention_pool, query)]:
        out, grads = outputs_and_grads(
            lambda a, b, fn=fn: fn(a, b, cu_seqlens=cu_seqlens, backend=backend),
            [x, other],
            torch.ones(len(values) - 1, 8, device=device),
            poisoned=True,
        )
        assert out.shape == (len(values) - 1, 8) and out.isfinite().all()
        assert all(g.isfinite().all() for g in grads)
