"""Fused masked_mean / masked_max / masked_mean_max against the reference: outputs and gradients,
every layout, dtype and fused backend, with outputs poisoned before the kernels run."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    FUSED,
    assert_close,
    cu_seqlens_of,
    make_generator,
    make_mask,
    outputs_and_grads,
    poison_padding,
    poisoned_allocations,
    random_like_output,
    stable_seed,
)

import fused_pool
from fused_pool import reference

OPS = ["masked_mean", "masked_max", "masked_mean_max"]

# (B, L, H): L = 1, L not a multiple of any block, H = 1, H not a power of two, a split sequence.
PADDED_SHAPES = [(1, 1, 1), (2, 5, 1), (3, 37, 40), (3, 70, 1000), (3, 300, 64)]
MASKS = ["none", "bool", "int", "float", "left_padded"]
# Varlen: empty and length-1 sequences; the last two take the split path.
LENGTHS = [[5, 0, 17, 1], [1], [300, 2, 0, 129], [0, 0, 700]]


def run_op(op, backend, x, mask=None, grad=None, **kwargs):
    """Output and dx of a fused op, with every allocation poisoned."""
    fn = lambda t: getattr(fused_pool, op)(t, mask, backend=backend, **kwargs)
    out, (dx,) = outputs_and_grads(fn, [x], grad, poisoned=True)
    return out, dx


def check_op(op, backend, x, mask=None, seed=0, **kwargs):
    """Compares output and dx with the reference; max results must match exactly."""
    ref = lambda t: getattr(reference, op)(t, mask, **kwargs)
    grad = random_like_output(ref(x).shape, x.dtype, x.device, seed)
    ref_out, (ref_dx,) = outputs_and_grads(ref, [x], grad)
    out, dx = run_op(op, backend, x, mask, grad, **kwargs)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == ref_out.shape
    assert dx.shape == x.shape and dx.dtype == x.dtype
    hidden = x.shape[-1]
    if op == "masked_max":
        assert_close(out, ref_out, exact=True)
    elif op == "masked_mean_max":
        assert_close(out[:, :hidden], ref_out[:, :hidden])
        assert_close(out[:, hidden:], ref_out[:, hidden:], exact=True)
    else:
        assert_close(out, ref_out)
    assert_close(dx, ref_dx)
    return out, dx


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_padded_matches_reference(op, shape, mask_kind, dtype, backend, device):
    gen = make_generator(stable_seed((op, shape, mask_kind)))
    batch, length, hidden = shape
    x = torch.randn(shape, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, batch, length, gen)
    mask = mask if mask is None else mask.to(device)
    check_op(op, backend, poison_padding(x, mask), mask)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_varlen_matches_reference(op, lengths, index_dtype, dtype, backend, device):
    gen = make_generator(sum(lengths) + len(lengths))
    x = torch.randn(sum(lengths), 48, generator=gen).to(device, dtype)
    cu_seqlens = cu_seqlens_of(lengths, index_dtype, device)
    check_op(op, backend, x, cu_seqlens=cu_seqlens)
    # The max_seqlen hint changes only the plan, never the result.
    check_op(op, backend, x, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_varlen_accepts_leading_one(op, backend, device):
    x = torch.randn(1, 30, 16, device=device)
    cu_seqlens = cu_seqlens_of([10, 20], device=device)
    out = getattr(fused_pool, op)(x, cu_seqlens=cu_seqlens, backend=backend)
    assert_close(out, getattr(reference, op)(x[0], cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, backend, device):
    gen = make_generator(1)
    # x strided along every axis: (L, B, 2H) transposed and every other channel.
    x = torch.randn(41, 3, 2 * 24, generator=gen).to(device).transpose(0, 1)[:, :, ::2]
    assert not x.is_contiguous() and x.stride(-1) == 2
    mask = (torch.rand(3, 2 * 41, generator=gen) > 0.4).to(device)[:, ::2]  # strided mask
    assert not mask.is_contiguous()
    check_op(op, backend, poison_padding(x, mask), mask)
    # Varlen x with a row stride larger than H.
    tokens = torch.randn(60, 40, generator=gen).to(device)[:, 3:27]
    check_op(op, backend, tokens, cu_seqlens=cu_seqlens_of([25, 0, 35], device=device))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_long_sequence_takes_split_path(op, backend, device):
    from fused_pool.triton_kernels.split_plan import plan_split

    batch, length, hidden = 1, 4096, 64
    assert plan_split(batch, batch * length, length, 1, 64, torch.device(device)).split
    gen = make_generator(2)
    x = torch.randn(batch, length, hidden, generator=gen).to(device)
    mask = (torch.rand(batch, length, generator=gen) > 0.5).to(device)
    check_op(op, backend, poison_padding(x, mask), mask)
    check_op(op, backend, x[0], cu_seqlens=cu_seqlens_of([1000, 3000, 96], device=device))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("length", [3, 700])  # one program; split into chunks
def test_max_ties_route_gradient_to_first(backend, device, length):
    gen = make_generator(3)
    x = torch.randint(-2, 3, (2, length, 20), generator=gen).float().to(device)  # many ties
    mask = torch.ones(2, length, dtype=torch.bool, device=device)
    for op in ("masked_max", "masked_mean_max"):
        check_op(op, backend, x, mask)
    check_op(
        "masked_max", backend, x.reshape(-1, 20), cu_seqlens=cu_seqlens_of([length, length], device=device)
    )


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("length", [6, 700])
def test_max_nan_and_inf(backend, device, length):
    x = torch.randn(3, length, 5, device=device)
    x[0, 2, 0] = x[0, length - 1, 0] = float("nan")  # first NaN wins and gets the gradient
    x[0, :, 1] = float("-inf")  # all -inf -> -inf, gradient to position 0
    x[1, 1, 2] = float("inf")
    x[1, length - 2, 2] = float("nan")  # NaN beats +inf
    x[2] = float("-inf")
    check_op("masked_max", backend, x)
    out, dx = run_op("masked_max", backend, x, grad=torch.ones(3, 5, device=device))
    assert (
        out[0, 0].isnan() and out[0, 1] == float("-inf") and out[1, 2].isnan() and not out[2].isfinite().any()
    )
    assert dx[0, 2, 0] == 1 and dx[0, :, 0].sum() == 1  # the first NaN takes the gradient
    assert dx[0, 0, 1] == 1 and dx[0, :, 1].sum() == 1  # all -inf: the first position
    assert dx[1, length - 2, 2] == 1 and dx[1, :, 2].sum() == 1


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_empty_sequences_give_zero(op, backend, device):
    x = torch.randn(2, 9, 8, device=device)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    mask[1, 4] = True
    out, dx = run_op(
        op,
        backend,
        poison_padding(x.clone(), mask),
        mask,
        torch.ones(2, 8 * (2 if op == "masked_mean_max" else 1), device=device),
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(dx[0], torch.zeros_like(dx[0]))
    # Varlen: zero-length segments and a zero-length input.
    out = getattr(fused_pool, op)(x[0], cu_seqlens=cu_seqlens_of([0, 9, 0], device=device), backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    empty = getattr(fused_pool, op)(
        x[0, :0], cu_seqlens=cu_seqlens_of([0, 0], device=device), backend=backend
    )
    assert empty.shape == out[:2].shape and not empty.any()


@pytest.mark.parametrize("backend, device", FUSED)
def test_weights_summing_to_zero_give_zero(backend, device):
    x = torch.randn(1, 4, 3, device=device)
    weights = torch.tensor([[1.0, -1.0, 0.0, 0.0]], device=device)
    check_op("masked_mean", backend, x, weights)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_degenerate_sizes(op, backend, device):
    for shape in [(0, 5, 4), (2, 0, 4), (2, 5, 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = getattr(fused_pool, op)(x, backend=backend)
        expected = getattr(reference, op)(x.detach())
        assert out.shape == expected.shape and not out.any()
        (dx,) = torch.autograd.grad(out.sum(), x)  # the kernels' backward, also for an empty output
        assert dx.shape == x.shape and not dx.any()


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_bitwise_deterministic(op, backend, device):
    gen = make_generator(4)
    x = torch.randn(2, 1500, 40, generator=gen).to(device, torch.bfloat16)
    mask = (torch.rand(2, 1500, generator=gen) > 0.3).to(device)
    grad = torch.randn(2, 80 if op == "masked_mean_max" else 40, generator=gen).to(device, torch.bfloat16)
    first = run_op(op, backend, x, mask, grad)
    second = run_op(op, backend, x, mask, grad)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_float64_gradcheck(op, backend, device):
    gen = make_generator(5)
    x = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weights = torch.rand(2, 7, generator=gen, dtype=torch.float64).to(device)
    weights[0, :3] = 0
    fn = getattr(fused_pool, op)
    assert torch.autograd.gradcheck(lambda t: fn(t, weights, backend=backend), (x,))
    cu_seqlens = cu_seqlens_of([3, 0, 11], device=device)
    tokens = torch.randn(14, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, cu_seqlens=cu_seqlens, backend=backend), (tokens,))


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "values", [[0, 5, 3, 8], [0, 40, 200], [-7, 3, 20], [5, -3, 10], [0, 2**31 - 1, 10]], ids=str
)
def test_malformed_cu_seqlens_stay_in_bounds(op, backend, device, values):
    """Decreasing, beyond T, negative: clamped to [0, T], never out of bounds, nothing unwritten."""
    x = torch.randn(20, 8, device=device, requires_grad=True)
    cu_seqlens = torch.tensor(values, dtype=torch.int32, device=device)
    with poisoned_allocations():
        out = getattr(fused_pool, op)(x, cu_seqlens=cu_seqlens, backend=backend)
        (dx,) = torch.autograd.grad(out.sum(), x)
    assert out.shape[0] == len(values) - 1
    assert out.isfinite().all() and dx.isfinite().all()
