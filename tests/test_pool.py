"""masked_mean / masked_max / masked_mean_max: the fused backends against the reference (outputs and
gradients, every layout, dtype and fused backend, outputs poisoned before the kernels run), the
reference's own semantics on hand-computed cases, the "torch" backend, and the extension's pool ops
called directly (varlen argmax relative to each sequence, per-token varlen weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    EXTENSION_DEVICES,
    FUSED,
    MASKS,
    assert_close,
    cu_seqlens_of,
    grad_of,
    make_generator,
    make_mask,
    needs_extension,
    outputs_and_grads,
    poison_padding,
    poisoned_allocations,
    random_like_output,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.contract import MAX, MEAN, MEAN_MAX
from fused_pool.ops import kernels

OPS = ["masked_mean", "masked_max", "masked_mean_max"]
NAN, INF = float("nan"), float("inf")
ops = torch.ops.fused_pool  # the extension's ops, called directly

# (B, L, H): L = 1, L not a multiple of any block, H = 1, H not a power of two, a split sequence.
PADDED_SHAPES = [(1, 1, 1), (2, 5, 1), (3, 37, 40), (3, 70, 1000), (3, 300, 64)]
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


@pytest.mark.parametrize("backend, device", FUSED)
def test_varlen_argmax_is_an_index_within_the_sequence(backend, device):
    """Saved for backward: the winner's index within its sequence, which fits int32 whatever T is."""
    gen = make_generator(12)
    lengths = [4, 0, 9, 300]
    x = torch.randn(sum(lengths), 24, generator=gen).to(device)
    cu_seqlens = cu_seqlens_of(lengths, device=device)
    _, _, argmax = kernels(backend, "pool").forward(x, None, cu_seqlens, None, MAX)
    starts = cu_seqlens[:-1].tolist()
    for b, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        expected = x[start : start + length].argmax(0) if length else torch.full((24,), -1)
        assert torch.equal(argmax[b].cpu().long(), expected.cpu())


# --- the reference on hand-computed cases: it is the oracle, so its expected values come from
# arithmetic done by hand here, never from the code under test ------------------------------------


def test_mean_of_kept_tokens():
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [NAN, NAN]]])  # the padded row holds NaN
    mask = torch.tensor([[True, True, False]])
    out, dx = grad_of(reference.masked_mean, x, mask)
    assert torch.equal(out, torch.tensor([[1.5, 15.0]]))
    assert torch.equal(dx, torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]]))


def test_weighted_mean():
    x = torch.tensor([[[1.0], [2.0], [7.0]]])
    weights = torch.tensor([[1.0, 3.0, 0.0]])
    out, dx = grad_of(reference.masked_mean, x, weights)
    assert torch.equal(out, torch.tensor([[1.75]]))  # (1*1 + 3*2) / 4
    assert torch.equal(dx, torch.tensor([[[0.25], [0.75], [0.0]]]))


def test_integer_mask_keeps_nonzero():
    x = torch.tensor([[[2.0], [4.0], [9.0]]])
    out = reference.masked_mean(x, torch.tensor([[3, 1, 0]]))  # nonzero = kept, not a weight
    assert torch.equal(out, torch.tensor([[3.0]]))


def test_no_mask_keeps_everything():
    x = torch.tensor([[[1.0], [2.0], [6.0]]])
    assert torch.equal(reference.masked_mean(x), torch.tensor([[3.0]]))
    assert torch.equal(reference.masked_max(x), torch.tensor([[6.0]]))


def test_empty_sequence_is_zero_with_zero_gradient():
    x = torch.tensor([[[5.0]], [[NAN]]])
    mask = torch.tensor([[True], [False]])
    for fn in (reference.masked_mean, reference.masked_max, reference.masked_mean_max):
        out, dx = grad_of(fn, x, mask)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(dx[1], torch.zeros_like(dx[1]))


def test_max_gradient_goes_to_first_maximum():
    x = torch.tensor([[[2.0], [5.0], [5.0], [9.0]]])
    mask = torch.tensor([[True, True, True, False]])  # 9 is padding
    out, dx = grad_of(reference.masked_max, x, mask)
    assert torch.equal(out, torch.tensor([[5.0]]))
    assert torch.equal(dx, torch.tensor([[[0.0], [1.0], [0.0], [0.0]]]))


def test_max_nan_propagates_and_takes_gradient():
    x = torch.tensor([[[1.0], [NAN], [INF], [NAN]]])
    out, dx = grad_of(reference.masked_max, x)
    assert out.isnan().all()
    assert torch.equal(dx, torch.tensor([[[0.0], [1.0], [0.0], [0.0]]]))


def test_max_all_minus_inf():
    x = torch.tensor([[[-INF], [-INF]]])
    out, dx = grad_of(reference.masked_max, x)
    assert torch.equal(out, torch.tensor([[-INF]]))
    assert torch.equal(dx, torch.tensor([[[1.0], [0.0]]]))


def test_mean_max_concatenates():
    x = torch.tensor([[[1.0, -1.0], [3.0, -5.0]]])
    assert torch.equal(reference.masked_mean_max(x), torch.tensor([[2.0, -3.0, 3.0, -1.0]]))


def test_varlen_segments():
    x = torch.tensor([[1.0], [3.0], [10.0], [20.0], [60.0]])
    cu_seqlens = torch.tensor([0, 2, 2, 5])  # lengths 2, 0, 3
    assert torch.equal(reference.masked_mean(x, cu_seqlens=cu_seqlens), torch.tensor([[2.0], [0.0], [30.0]]))
    assert torch.equal(reference.masked_max(x, cu_seqlens=cu_seqlens), torch.tensor([[3.0], [0.0], [60.0]]))


def test_varlen_clamps_malformed_bounds():
    x = torch.tensor([[1.0], [2.0], [4.0]])
    cu_seqlens = torch.tensor([-5, 1, 0, 99])  # [0, 1), [1, 1) (decreasing: empty), [0, 3)
    assert torch.equal(reference.masked_mean(x, cu_seqlens=cu_seqlens), torch.tensor([[1.0], [0.0], [7 / 3]]))


def test_low_precision_accumulates_in_float32():
    # 4096 copies of 1 + 2^-7 (exact in bfloat16): a bfloat16 running sum would stall at 256.
    x = torch.full((1, 4096, 1), 1 + 2**-7, dtype=torch.bfloat16)
    assert reference.masked_mean(x).item() == 1 + 2**-7


# --- the "torch" backend (plain PyTorch kernels behind the same op layer) ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "left_padded"])
@pytest.mark.parametrize("op", OPS)
def test_pool_padded(op, mask_kind, dtype):
    gen = make_generator(len(op) + len(mask_kind))
    x = torch.randn(4, 23, 12, generator=gen).to(dtype)
    mask = make_mask(mask_kind, 4, 23, gen)
    check_op(op, "torch", poison_padding(x, mask), mask)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("op", OPS)
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


# --- the extension's pool ops called directly: masked_max's argmax is the index within the sequence,
# not the global token; per-token varlen weights (T,) for masked_mean -----------------------------


def _expected_argmax(x, cu):
    rows = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        start, end = min(max(start, 0), len(x)), min(max(end, 0), len(x))
        end = max(end, start)
        rows.append(
            x[start:end].argmax(0).int() if end > start else torch.full((x.shape[1],), -1, dtype=torch.int32)
        )
    return torch.stack(rows)


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", [MAX, MEAN_MAX])
@pytest.mark.parametrize("lengths", [[3, 0, 7], [100, 4900, 4000, 1]], ids=["short", "split"])
def test_varlen_argmax_is_relative_to_sequence_start_cpu(device, mode, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    # Few distinct values: many ties, whose first maximal position must win across split chunks.
    x = torch.randint(0, 4, (total, 24), generator=gen).float()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _, _, argmax = ops.ext_pool_fwd(x.to(device), None, cu.to(device), None, mode)
    assert torch.equal(argmax.cpu(), _expected_argmax(x, cu))

    # The backward reads the same: the gradient lands on row cu[b] + argmax[b].
    grad = torch.randn(len(lengths), 24 * (2 if mode == MEAN_MAX else 1), generator=gen)
    den = torch.tensor(lengths, dtype=torch.float32)
    dx = ops.ext_pool_bwd(
        grad.to(device), None, cu.to(device), den.to(device), argmax, [total, 24], x.dtype, mode
    )
    expected = torch.zeros(total, 24)
    g_max = grad[:, 24:] if mode == MEAN_MAX else grad
    for b, (start, length) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        if mode == MEAN_MAX and length:
            expected[start : start + length] += grad[b, :24] / length
        for c in range(24):
            if argmax[b, c] >= 0:
                expected[start + int(argmax[b, c]), c] += g_max[b, c]
    torch.testing.assert_close(dx.cpu(), expected)


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_padded_argmax_is_the_position_cpu(device):
    x = torch.randn(3, 6, 5)
    mask = torch.rand(3, 6) > 0.3
    mask[1] = False
    _, _, argmax = ops.ext_pool_fwd(x.to(device), mask.to(device), None, None, MAX)
    expected = x.masked_fill(~mask[..., None], -torch.inf).argmax(1).int()
    expected[~mask.any(1)] = -1
    assert torch.equal(argmax.cpu(), expected)


def _weighted_means(x, w, cu):
    rows, dens = [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        total = w[start:end].double().sum()
        mean = (w[start:end, None].double() * x[start:end].double()).sum(0) / total
        rows.append(mean if total != 0 else torch.zeros(x.shape[1], dtype=torch.float64))
        dens.append(total)
    return torch.stack(rows), torch.stack(dens)


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float16)],
)
@pytest.mark.parametrize("lengths", [[3, 0, 5, 2], [40, 5000, 1200]], ids=["short", "split"])
def test_varlen_per_token_weights_cpu(device, x_dtype, w_dtype, lengths):
    gen = torch.Generator().manual_seed(7)
    total = sum(lengths)
    x = torch.randn(total, 16, generator=gen).to(x_dtype)
    w = torch.rand(2 * total, generator=gen).to(w_dtype)[::2]  # strided weights
    w[: lengths[0]] = 0  # a sequence whose weights sum to 0 pools to 0
    w[lengths[0]] = -0.5 if lengths[0] == 40 else 0  # negative weights are weights too
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    out, den, _ = ops.ext_pool_fwd(x.to(device), w.to(device), cu.to(device), None, MEAN)
    expected, expected_den = _weighted_means(x, w, cu)
    tol = dict(atol=1e-5, rtol=1e-5) if x_dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.cpu().double(), expected, **tol)
    torch.testing.assert_close(den.cpu().double(), expected_den, atol=1e-4, rtol=1e-5)

    grad = torch.randn(len(lengths), 16, generator=gen).to(device)
    no_argmax = torch.empty(0, dtype=torch.int32, device=device)
    dx = ops.ext_pool_bwd(grad, w.to(device), cu.to(device), den, no_argmax, list(x.shape), x_dtype, MEAN)
    segments = zip(cu[:-1].tolist(), cu[1:].tolist(), den.cpu().double().tolist(), strict=True)
    scale = torch.cat(
        [w[a:b].double() / d if d != 0 else torch.zeros(b - a, dtype=torch.float64) for a, b, d in segments]
    )
    expected_dx = scale[:, None] * grad.cpu().double().repeat_interleave(torch.tensor(lengths), 0)
    torch.testing.assert_close(dx.cpu().double(), expected_dx, **tol)


class _WeightedMean(torch.autograd.Function):
    """ext_pool_fwd / ext_pool_bwd wired by hand (independent of fused_pool.ops)."""

    @staticmethod
    def forward(ctx, x, w, cu):
        out, den, argmax = ops.ext_pool_fwd(x, w, cu, None, MEAN)
        ctx.save_for_backward(w, cu, den, argmax)
        ctx.x_shape, ctx.x_dtype = list(x.shape), x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        w, cu, den, argmax = ctx.saved_tensors
        return ops.ext_pool_bwd(grad, w, cu, den, argmax, ctx.x_shape, ctx.x_dtype, MEAN), None, None


@needs_extension
def test_varlen_per_token_weights_gradcheck_cpu():
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda x: _WeightedMean.apply(x, w, cu), (x,))


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_varlen_weights_keep_nonzero_tokens_for_max_cpu(device):
    x = torch.randn(10, 4)
    w = torch.tensor([0, 1, 2, 0, 0, 0.5, 1, 0, 3, 0])
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    out, _, argmax = ops.ext_pool_fwd(x.to(device), w.to(device), cu.to(device), None, MAX)
    kept = x.masked_fill(w[:, None] == 0, -torch.inf)
    torch.testing.assert_close(out.cpu(), torch.stack([kept[:5].max(0).values, kept[5:].max(0).values]))
    assert torch.equal(argmax.cpu(), torch.stack([kept[:5].argmax(0), kept[5:].argmax(0)]).int())
