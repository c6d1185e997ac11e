"""attention_pool (given scores), and the tests that run attention_pool and query_attention_pool on
the same inputs (both are softmax pooling over the same kernels): the fused backends against the
reference (outputs and the gradients of x, scores and query, every layout, dtype, head count and
fused backend, outputs poisoned), the reference's own semantics on hand-computed cases, the "torch"
backend, per-token varlen masks on the extension's ops. query_attention_pool alone:
test_query_attention.py; non-finite scores: test_attention_nonfinite.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ATTENTION_PADDED_SHAPES,
    DTYPES,
    EXTENSION_DEVICES,
    FUSED,
    HEADS,
    MASKS,
    assert_close,
    check_attention,
    cu_seqlens_of,
    grad_of,
    make_generator,
    make_mask,
    make_query,
    make_scores,
    needs_extension,
    outputs_and_grads,
    poison_padding,
    poisoned_allocations,
    random_like_output,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.contract import MEAN_MAX
from fused_pool.ops import kernels

LENGTHS = [[5, 0, 17, 1], [300, 2, 0, 129]]
NAN, INF = float("nan"), float("inf")
ops = torch.ops.fused_pool  # the extension's ops, called directly


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_heads", HEADS)
@pytest.mark.parametrize("shape", ATTENTION_PADDED_SHAPES, ids=str)
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


# --- the reference on hand-computed cases ----------------------------------------------------------


def test_attention_pool_weights():
    x = torch.tensor([[[1.0, 2.0], [5.0, 6.0], [NAN, NAN]]])
    scores = torch.tensor([[0.0, math.log(3.0), 100.0]])  # softmax over kept -> [1/4, 3/4]
    mask = torch.tensor([[1, 1, 0]])
    out = reference.attention_pool(x, scores, mask)
    torch.testing.assert_close(out, torch.tensor([[1 / 4 + 15 / 4, 2 / 4 + 18 / 4]]))


def test_attention_pool_gradients():
    # Two tokens, scores (0, 0): p = (1/2, 1/2), out = (a + b) / 2.
    x = torch.tensor([[[2.0], [4.0]]], requires_grad=True)
    scores = torch.zeros(1, 2, requires_grad=True)
    out = reference.attention_pool(x, scores)
    out.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[0.5], [0.5]]]))
    # d out / d s_l = p_l (x_l - out) = 1/2 * (2 - 3), 1/2 * (4 - 3)
    torch.testing.assert_close(scores.grad, torch.tensor([[-0.5, 0.5]]))


def test_attention_pool_heads():
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0]]])
    scores = torch.tensor([[[0.0, 0.0], [0.0, -INF]]])  # head 0 averages, head 1 keeps token 0
    torch.testing.assert_close(reference.attention_pool(x, scores), torch.tensor([[2.0, 10.0]]))


def test_attention_pool_all_minus_inf_is_empty():
    x = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    scores = torch.tensor([[-INF, -INF], [0.0, -INF]], requires_grad=True)
    out, dx = grad_of(lambda t: reference.attention_pool(t, scores), x)
    assert torch.equal(out, torch.tensor([[0.0], [3.0]]))
    assert torch.equal(dx, torch.tensor([[[0.0], [0.0]], [[1.0], [0.0]]]))
    (ds,) = torch.autograd.grad(reference.attention_pool(x, scores).sum(), scores)
    assert torch.equal(ds, torch.zeros(2, 2))


def test_attention_pool_huge_scores():
    x = torch.tensor([[[1.0], [2.0]]])
    scores = torch.tensor([[1e4, -1e4]], dtype=torch.float16)
    assert torch.equal(reference.attention_pool(x, scores), torch.tensor([[1.0]]))


# --- the "torch" backend (plain PyTorch kernels behind the same op layer) ---------------------------


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


# --- the extension's ops called directly: a per-token varlen mask (T,) -----------------------------


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("query_mode", [False, True], ids=["scores", "query"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_attention_varlen_per_token_mask_cpu(device, query_mode, mask_dtype):
    """A per-token varlen mask (T,) drops tokens, which are never read (NaN there stays out), and
    equals pooling the kept tokens alone, forward and backward (fused_pool.distributed's zigzag
    layout drops padding this way)."""
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 4, 4, 11, 14], dtype=torch.int64)  # lengths 4, 0, 7, 3
    num_tokens, heads, hidden = 14, 2, 6
    keep = torch.rand(num_tokens, generator=gen) > 0.4
    keep[11:14] = False  # a sequence whose tokens are all dropped pools to 0
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    x[~keep] = float("nan")
    other = torch.randn(heads, hidden // heads, dtype=torch.float64, generator=gen)
    if not query_mode:
        other = torch.randn(num_tokens, heads, dtype=torch.float64, generator=gen)
    kept_cu = torch.tensor([0, *[int(keep[a:b].sum()) for a, b in zip(cu[:-1], cu[1:], strict=True)]]).cumsum(
        0
    )
    x_kept = x[keep].clone().requires_grad_()
    if query_mode:
        expected = reference.query_attention_pool(x_kept, other, cu_seqlens=kept_cu, scale=0.6)
        forward, backward, tail = ops.ext_query_attention_fwd, ops.ext_query_attention_bwd, (0.6,)
    else:
        expected = reference.attention_pool(x_kept, other[keep], cu_seqlens=kept_cu)
        forward, backward, tail = ops.ext_attention_fwd, ops.ext_attention_bwd, ()
    grad = torch.randn(len(cu) - 1, hidden, dtype=torch.float64, generator=gen)
    (expected_dx,) = torch.autograd.grad(expected, x_kept, grad)

    mask = keep.to(mask_dtype).to(device)
    args = (x.to(device), other.to(device), mask, cu.to(device))
    with poisoned_allocations():
        out, stats = forward(*args, None, *tail)
        dx, _ = backward(grad.to(device), *args, out, stats, *tail)
    torch.testing.assert_close(out.cpu(), expected.detach(), atol=1e-10, rtol=1e-10)
    assert torch.equal(dx.cpu()[~keep], torch.zeros_like(dx.cpu()[~keep]))
    torch.testing.assert_close(dx.cpu()[keep], expected_dx, atol=1e-10, rtol=1e-10)
