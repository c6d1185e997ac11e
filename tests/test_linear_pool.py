"""linear_pool (op kind "linear"): every backend against fused_pool.reference in float64 (outputs and
gradients of x, weight and bias, NaN wherever not kept, allocations poisoned): modes x activations,
padded and varlen, edge sizes, strides, bf16 / fp16 / fp32, max ties and NaNs, determinism, compile,
opcheck, argument errors; the memory bounds are in test_linear_memory.py. Also the reference itself."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    MASKS,
    assert_close,
    assert_within_reference_error,
    cu_seqlens_of,
    kernel_backends,
    make_generator,
    make_mask,
    outputs_and_grads,
    poison_padding,
    random_like_output,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.contract import ACTIVATIONS, MAX, MEAN, SUM
from fused_pool.ops import kernels

MODES = ["max", "sum", "mean"]
ACTIVATION_NAMES = [None, *ACTIVATIONS[1:]]
NAN = float("nan")


LINEAR_BACKENDS = kernel_backends("linear")  # (backend, device) pairs that run linear_pool here
backends = pytest.mark.parametrize("backend, device", LINEAR_BACKENDS)


# --- inputs ------------------------------------------------------------------------------------------


def make_projection(hidden, features, gen, bias=True, dtype=torch.float64):
    """weight (N, H) scaled so that z = x W^T + b is ~N(0, 1.25): every activation's bend is used."""
    weight = torch.randn(features, hidden, generator=gen, dtype=torch.float64) / max(hidden, 1) ** 0.5
    b = torch.randn(features, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    return weight.to(dtype), None if b is None else b.to(dtype)


def make_grid_inputs(shape, features, gen, dtype):
    """x, weight and bias on grids (steps 1/2, 1/4, 1/8): every z is an exact multiple of 1/8 in bf16
    and float32, so "max" picks the same winners (ties too) in a float32 kernel and the float64
    reference. Some z are exactly 0, where relu's gradient is 0, as torch's."""
    x = torch.randint(-2, 3, shape, generator=gen).to(dtype) / 2
    weight = torch.randint(-2, 3, (features, shape[-1]), generator=gen).to(dtype) / 4
    bias = torch.randint(-8, 9, (features,), generator=gen).to(dtype) / 8
    return x, weight, bias


def make_varlen(lengths, hidden, gen, trailing=3, weights=True, dtype=torch.float64):
    """(T, H) tokens with `trailing` tokens after the last sequence, cu_seqlens, per-token weights
    (T,) with some zeros; NaN in every token that is outside the sequences or has weight 0."""
    total = sum(lengths) + trailing
    x = torch.randn(total, hidden, generator=gen, dtype=torch.float64)
    w = torch.rand(total, generator=gen, dtype=torch.float64) * 1.75 + 0.25
    w[torch.rand(total, generator=gen) < 0.2] = 0
    kept = (w != 0) if weights else torch.ones(total, dtype=torch.bool)
    kept[sum(lengths) :] = False
    x[~kept] = NAN
    return x.to(dtype), cu_seqlens_of(lengths), (w.float() if weights else None)


def _not_kept(x, mask, cu_seqlens):
    """Bool of x's token shape: positions that no sequence keeps (their dx must be exactly 0)."""
    if cu_seqlens is None:
        return torch.zeros(x.shape[:-1], dtype=torch.bool) if mask is None else (mask == 0).cpu()
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    inside = torch.zeros(tokens, dtype=torch.bool)
    starts, ends = reference._segment_bounds(cu_seqlens.cpu(), tokens)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        inside[start:end] = True
    inside &= True if mask is None else mask.cpu() != 0
    return (~inside).reshape(x.shape[:-1])


# --- the check against the reference -----------------------------------------------------------------


def check_linear(backend, device, x, weight, bias, mask=None, *, mode, activation=None, seed=0, **kwargs):
    """Output and gradients of x, weight and bias (poisoned allocations) against the reference: float64
    to float64 tolerance; lower precisions: the output to the dtype's tolerance of the reference at that
    precision, gradients within twice its error against float64. dx is 0 wherever not kept."""
    move = lambda t: None if t is None else t.to(device)
    x, weight, bias, mask = move(x), move(weight), move(bias), move(mask)
    kwargs = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs.update(mode=mode, activation=activation)

    def ref(x, w, *b):
        return reference.linear_pool(x, w, b[0] if b else None, mask, **kwargs)

    def fused(x, w, *b):
        return fused_pool.linear_pool(x, w, b[0] if b else None, mask, backend=backend, **kwargs)

    leaves = [x, weight] + ([] if bias is None else [bias])
    exact_leaves = [t.double() for t in leaves]
    grad = random_like_output(ref(*exact_leaves).shape, x.dtype, device, seed)
    exact_out, exact_grads = outputs_and_grads(ref, exact_leaves, grad.double())
    out, grads = outputs_and_grads(fused, leaves, grad, poisoned=True)
    assert out.shape == exact_out.shape and out.dtype == x.dtype and out.is_contiguous()
    for actual, leaf in zip(grads, leaves, strict=True):
        assert actual.shape == leaf.shape and actual.dtype == leaf.dtype
    if x.dtype == torch.float64:
        assert_close(out, exact_out)
        for actual, exact in zip(grads, exact_grads, strict=True):
            assert_close(actual, exact)
    else:
        ref_out, ref_grads = outputs_and_grads(ref, leaves, grad)
        assert_close(out, ref_out)
        for actual, expected, exact in zip(grads, ref_grads, exact_grads, strict=True):
            assert_within_reference_error(actual, expected, exact, x.dtype)
    not_kept = _not_kept(x, mask, kwargs.get("cu_seqlens")).to(device)
    assert not grads[0][not_kept].any(), "dx is not 0 where no sequence keeps the token"
    return out, grads


# --- every backend against the reference --------------------------------------------------------------


@backends
@pytest.mark.parametrize("activation", ACTIVATION_NAMES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_padded_every_activation(mode, activation, backend, device):
    gen = make_generator(stable_seed("padded", mode, activation))
    x = torch.randn(3, 13, 24, generator=gen, dtype=torch.float64)
    mask = make_mask("float", 3, 13, gen)  # an empty sequence, a single-token one
    weight, bias = make_projection(24, 37, gen)
    check_linear(
        backend, device, poison_padding(x, mask), weight, bias, mask, mode=mode, activation=activation
    )


@backends
@pytest.mark.parametrize("mask_kind", [*MASKS, "all_padding"])
@pytest.mark.parametrize("mode", MODES)
def test_padded_masks(mode, mask_kind, backend, device):
    gen = make_generator(stable_seed("masks", mode, mask_kind))
    x = torch.randn(4, 11, 20, generator=gen, dtype=torch.float64)
    if mask_kind == "all_padding":
        mask = torch.zeros(4, 11, dtype=torch.bool)
        mask[2, 3:7] = True  # one sequence keeps a few tokens, the others none
    else:
        mask = make_mask(mask_kind, 4, 11, gen)
    weight, bias = make_projection(20, 29, gen)
    out, grads = check_linear(
        backend, device, poison_padding(x, mask), weight, bias, mask, mode=mode, activation="log1p_relu"
    )
    if mask is not None:  # an empty sequence pools to 0 whatever the bias
        empty = (mask == 0).all(1).to(device)
        assert empty.any() and not out[empty].any()


@backends
@pytest.mark.parametrize("activation", ACTIVATION_NAMES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_varlen_every_activation(mode, activation, backend, device):
    """Per-token float weights, an empty and a length-1 sequence, tokens after the last one."""
    gen = make_generator(stable_seed("varlen", mode, activation))
    x, cu_seqlens, weights = make_varlen([5, 0, 17, 1], 24, gen)
    w, b = make_projection(24, 37, gen)
    check_linear(backend, device, x, w, b, weights, mode=mode, activation=activation, cu_seqlens=cu_seqlens)


VARLEN_LAYOUTS = {  # name -> (cu_seqlens dtype, x as (1, T, H), per-token weights, max_seqlen hint)
    "int32": (torch.int32, False, False, None),
    "int64": (torch.int64, False, False, None),
    "int64_weights_hint": (torch.int64, False, True, 150),
    "leading_one": (torch.int32, True, False, None),
    "leading_one_weights": (torch.int32, True, True, 10_000),
}


@backends
@pytest.mark.parametrize("layout", list(VARLEN_LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
def test_varlen_layouts(mode, layout, backend, device):
    """A long sequence (beyond any token block), empty and length-1 ones, int32 / int64 cu_seqlens,
    (1, T, H) input, per-token weights, max_seqlen hints (exact, and larger than T)."""
    index_dtype, leading_one, weights, hint = VARLEN_LAYOUTS[layout]
    gen = make_generator(stable_seed("varlen_layout", mode, layout))
    x, cu_seqlens, token_weights = make_varlen([1, 0, 150, 7, 0], 16, gen, weights=weights)
    x, cu_seqlens = (x[None] if leading_one else x), cu_seqlens.to(index_dtype)
    w, b = make_projection(16, 21, gen)
    kwargs = dict(mode=mode, activation="log1p_relu", cu_seqlens=cu_seqlens, max_seqlen=hint)
    check_linear(backend, device, x, w, b, token_weights, **kwargs)


@backends
@pytest.mark.parametrize("activation", ["log1p_relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision(mode, dtype, activation, backend, device):
    """Padded and varlen; "max" on grid inputs, so winners do not hinge on rounding."""
    gen = make_generator(stable_seed("low_precision", mode, dtype, activation))
    if mode == "max":
        x, weight, bias = make_grid_inputs((3, 21, 40), 50, gen, dtype)
    else:
        x = torch.randn(3, 21, 40, generator=gen).to(dtype)
        weight, bias = make_projection(40, 50, gen, dtype=dtype)
    mask = make_mask("bool", 3, 21, gen)
    check_linear(
        backend, device, poison_padding(x.clone(), mask), weight, bias, mask, mode=mode, activation=activation
    )
    tokens = x.reshape(63, 40)[:50]
    cu_seqlens = cu_seqlens_of([20, 0, 1, 29])
    check_linear(
        backend, device, tokens, weight, bias, mode=mode, activation=activation, cu_seqlens=cu_seqlens
    )


# (B, L, H, N): L = 1, H = 1, N = 1, H and N not powers of two and wider than a tile, a long sequence.
EDGE_SHAPES = [(1, 1, 1, 1), (2, 1, 7, 5), (3, 9, 1, 33), (2, 70, 130, 67), (1, 5, 24, 300), (2, 260, 16, 9)]


@backends
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_edge_sizes(mode, shape, backend, device):
    batch, length, hidden, features = shape
    gen = make_generator(stable_seed("edge", mode, shape))
    x = torch.randn(batch, length, hidden, generator=gen, dtype=torch.float64)
    weight, bias = make_projection(hidden, features, gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[:, 0] = True
    check_linear(backend, device, x, weight, bias, mode=mode, activation="silu")
    check_linear(backend, device, poison_padding(x, mask), weight, bias, mask, mode=mode, activation="silu")


@backends
@pytest.mark.parametrize("mode", MODES)
def test_degenerate_sizes(mode, backend, device):
    """B = 0, L = 0, T = 0, no sequence at all, N = 0, H = 0 (z = bias): shapes, zeros, gradients."""
    gen = make_generator(stable_seed("degenerate", mode))
    # (x shape, N, varlen lengths or None)
    cases = [((0, 5, 4), 6, None), ((2, 0, 4), 6, None), ((2, 5, 4), 0, None), ((2, 5, 0), 6, None)]
    for shape, features, lengths in [*cases, ((7, 4), 6, [])]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        weight, bias = make_projection(shape[-1], features, gen)
        kwargs = {} if lengths is None else dict(cu_seqlens=cu_seqlens_of(lengths))
        check_linear(backend, device, x, weight, bias, mode=mode, activation="gelu", **kwargs)
    # T = 0 (where the reference's output is no function of x): zeros, and zero gradients.
    cu_seqlens = cu_seqlens_of([0, 0], device=device)
    call = lambda *t: fused_pool.linear_pool(*t, cu_seqlens=cu_seqlens, mode=mode, backend=backend)
    leaves = [torch.randn(0, 4, device=device), weight.float().to(device), bias.float().to(device)]
    out, grads = outputs_and_grads(call, leaves, torch.ones(2, 6, device=device), poisoned=True)
    assert out.shape == (2, 6) and not out.any() and not any(g.any() for g in grads)


@backends
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode, backend, device):
    gen = make_generator(stable_seed("strided", mode))
    # x strided along every axis: (L, B, 2H) transposed, every other channel.
    x = torch.randn(19, 3, 2 * 24, generator=gen, dtype=torch.float64).transpose(0, 1)[:, :, ::2]
    # weight (N, H) with strides (1, 2N), bias with stride 2.
    weight = torch.randn(24, 2 * 31, generator=gen, dtype=torch.float64).t()[::2] / 5
    bias = torch.randn(2 * 31, generator=gen, dtype=torch.float64)[::2]
    mask = (torch.rand(3, 2 * 19, generator=gen) > 0.4)[:, ::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous() or mask.is_contiguous())
    x = poison_padding(x, mask)
    check_linear(backend, device, x, weight, bias, mask, mode=mode, activation="tanh")
    tokens = torch.randn(60, 40, generator=gen, dtype=torch.float64)[:, 3:27]  # row stride 40 > H
    weights = torch.rand(2 * 60, generator=gen)[::2]
    cu_seqlens = cu_seqlens_of([25, 0, 35])
    check_linear(
        backend, device, tokens, weight, bias, weights, mode=mode, activation="tanh", cu_seqlens=cu_seqlens
    )


@backends
@pytest.mark.parametrize("mode", MODES)
def test_bias_none(mode, backend, device):
    """No bias: against the reference, and equal to a zero bias."""
    gen = make_generator(stable_seed("bias_none", mode))
    x, mask = torch.randn(3, 10, 12, generator=gen, dtype=torch.float64), make_mask("bool", 3, 10, gen)
    weight, zero = make_projection(12, 17, gen)[0], torch.zeros(17, dtype=torch.float64)
    out, grads = check_linear(backend, device, poison_padding(x, mask), weight, None, mask, mode=mode)
    zero_out, zero_grads = check_linear(backend, device, x, weight, zero, mask, mode=mode)
    for actual, expected in zip([out, *grads], [zero_out, *zero_grads[:2]], strict=True):
        assert_close(actual, expected)


@backends
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_weights_summing_to_zero(mode, backend, device):
    """mean: a sum of weights of 0 pools to 0; sum: negative weights are weights."""
    gen = make_generator(stable_seed("zero_sum", mode))
    x = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    weights = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.5, -2.0, 1.0, 0.0]])
    weight, bias = make_projection(6, 5, gen)
    out, _ = check_linear(backend, device, poison_padding(x, weights), weight, bias, weights, mode=mode)
    assert mode == "sum" or not out[0].any()


# --- max: ties and NaN ---------------------------------------------------------------------------------


@backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "tanh"], ids=str)
def test_max_ties_route_gradient_to_first(activation, dtype, backend, device):
    """Every kept token of a sequence is the same vector: every column ties, and the whole gradient
    goes to the first kept token (position 2 of sequence 0, behind padding; 0 of sequence 1)."""
    gen = make_generator(stable_seed("ties", activation, dtype))
    x, weight, bias = make_grid_inputs((2, 1, 10), 12, gen, dtype)
    x = x.expand(2, 7, 10).clone()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 4] = False
    x = poison_padding(x, mask)
    _, (dx, *_) = check_linear(backend, device, x, weight, bias, mask, mode="max", activation=activation)
    first = torch.zeros(2, 7, dtype=torch.bool)
    first[0, 2] = first[1, 0] = True
    assert not dx[~first.to(device)].any() and dx[first.to(device)].any()
    tokens = x[1]  # varlen: the same ties within [0, 3) and [3, 7) (token 4 outside the mask: a NaN)
    tokens = torch.where(tokens.isnan(), tokens[0], tokens)
    _, (dx, *_) = check_linear(
        backend,
        device,
        tokens,
        weight,
        bias,
        mode="max",
        activation=activation,
        cu_seqlens=cu_seqlens_of([3, 4]),
    )
    assert dx[0].any() and dx[3].any() and not dx[[1, 2, 4, 5, 6]].any()


@backends
@pytest.mark.parametrize("activation", ACTIVATION_NAMES, ids=str)
def test_max_kept_nan_propagates(activation, backend, device):
    """A NaN in a kept token makes its whole row of z NaN: the sequence's max is NaN in every column,
    as torch.max; a NaN bias entry makes its column NaN in every sequence that keeps a token (an
    empty one stays 0). The gradient goes to the first NaN token; a later one (token 6) is not read
    by the backward, which gathers the winners: the same results as with that NaN replaced by 0 (the
    dense eager backward, dz^T x, would spread it into dweight as 0 * NaN)."""
    gen = make_generator(stable_seed("nan", activation))
    x = torch.randn(3, 8, 10, generator=gen, dtype=torch.float64)
    weight, bias = make_projection(10, 14, gen)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2] = False
    x[0, 3, 4] = NAN
    bias[5] = NAN
    x = poison_padding(x, mask)
    out, grads = check_linear(backend, device, x, weight, bias, mask, mode="max", activation=activation)
    assert out[0].isnan().all() and out[1, 5].isnan() and not out[1, :5].isnan().any() and not out[2].any()
    x[0, 6, 1] = NAN  # a second NaN token, after the first
    call = lambda *t: fused_pool.linear_pool(
        *t, mask.to(device), mode="max", activation=activation, backend=backend
    )
    grad = random_like_output(out.shape, out.dtype, device)
    again, again_grads = outputs_and_grads(call, [x.to(device), weight.to(device), bias.to(device)], grad)
    assert_close(again, out, exact=True)
    for actual, expected in zip(again_grads, grads, strict=True):
        assert_close(actual, expected, exact=True)


# --- determinism, compile, opcheck --------------------------------------------------------------------


@backends
@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic(mode, backend, device):
    gen = make_generator(stable_seed("deterministic", mode))
    x = torch.randn(4, 150, 48, generator=gen).to(device)
    mask = (torch.rand(4, 150, generator=gen) > 0.3).to(device)
    weight, bias = make_projection(48, 130, gen, dtype=torch.float32)
    leaves = [x, weight.to(device), bias.to(device)]
    grad = torch.randn(4, 130, generator=gen).to(device)
    fn = lambda *t: fused_pool.linear_pool(*t, mask, mode=mode, activation="log1p_relu", backend=backend)
    first = outputs_and_grads(fn, leaves, grad)
    second = outputs_and_grads(fn, leaves, grad)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


@backends
@pytest.mark.parametrize("mode", MODES)
def test_fullgraph_dynamic_without_recompiling(mode, backend, device):
    """torch.compile(fullgraph=True, dynamic=True): one graph per layout as B, L and T change; the
    outputs and the gradients of x, weight and bias equal eager's."""
    gen = make_generator(stable_seed("compile", mode))
    weight, bias = make_projection(12, 7, gen, dtype=torch.float32)  # N = 7: no size of x
    weight, bias = weight.to(device), bias.to(device)
    kwargs = dict(mode=mode, activation="gelu", backend=backend)
    padded = lambda x, w, b, m: fused_pool.linear_pool(x, w, b, m, **kwargs)
    varlen = lambda x, w, b, cu: fused_pool.linear_pool(x, w, b, cu_seqlens=cu, **kwargs)
    torch._dynamo.reset()
    compiled = {padded: torch.compile(padded, fullgraph=True, dynamic=True)}
    compiled[varlen] = torch.compile(varlen, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(2, 9), (3, 17), (5, 4), (2, 30)]:
            mask = (torch.rand(batch, length, generator=gen) > 0.3).to(device)
            cu_seqlens = cu_seqlens_of(list(range(length % 5 + 1, length % 5 + 1 + batch)), device=device)
            grad = torch.randn(batch, 7, generator=gen).to(device)
            for fn, shape, structure in [
                (padded, (batch, length), mask),
                (varlen, (int(cu_seqlens[-1]),), cu_seqlens),
            ]:
                x = torch.randn(*shape, 12, generator=gen).to(device)
                expected = outputs_and_grads(lambda *t, f=fn, s=structure: f(*t, s), [x, weight, bias], grad)
                actual = outputs_and_grads(
                    lambda *t, f=compiled[fn], s=structure: f(*t, s), [x, weight, bias], grad
                )
                for a, e in zip([actual[0], *actual[1]], [expected[0], *expected[1]], strict=True):
                    assert_close(a, e)


@backends
@pytest.mark.parametrize("mode", [MAX, SUM, MEAN])
def test_opcheck(mode, backend, device):
    op = kernels(backend, "linear").forward_op
    gen = make_generator(stable_seed("opcheck", mode))
    x = torch.randn(3, 10, 8, generator=gen).to(device).requires_grad_()
    weight = torch.randn(5, 8, generator=gen).to(device).requires_grad_()
    bias = torch.randn(5, generator=gen).to(device).requires_grad_()
    mask = (torch.rand(3, 10, generator=gen) > 0.3).to(device)
    cu = cu_seqlens_of([4, 0, 6], device=device)
    for args in [
        (x, weight, bias, None, None, None, mode, 2),
        (x, weight, None, mask, None, None, mode, 0),
        (x, weight, bias, mask.float(), None, None, mode, 6),
        (x[0], weight, bias, None, cu, None, mode, 4),
        (x[0], weight, bias, torch.rand(10, device=device), cu.long(), 6, mode, 1),
    ]:
        torch.library.opcheck(op, args)


@backends
@pytest.mark.parametrize(
    "values", [[0, 5, 3, 8], [0, 40, 200], [-7, 3, 20], [5, -3, 10], [0, 2**31 - 1, 10]], ids=str
)
def test_malformed_cu_seqlens_stay_in_bounds(values, backend, device):
    """Beyond T, negative, decreasing: in bounds, all written; the reference's result where the clamped
    bounds increase. Where they decrease, a backend may clamp each segment alone (the reference) or keep
    each token in one sequence (the token-block GEMMs of "torch", "cpu"): bounds and finiteness only."""
    gen = make_generator(stable_seed("malformed", values))
    x = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    weight, bias = make_projection(8, 6, gen)
    cu_seqlens = torch.tensor(values, dtype=torch.int32)
    increasing = bool((cu_seqlens.clamp(0, 20).diff() >= 0).all())
    leaves, grad = [t.to(device) for t in (x, weight, bias)], torch.ones(len(values) - 1, 6, device=device)
    for mode in MODES:
        kwargs = dict(mode=mode, cu_seqlens=cu_seqlens.to(device))
        call = lambda *t, k=kwargs: fused_pool.linear_pool(*t, backend=backend, **k)
        if increasing:
            out, grads = check_linear(backend, device, x, weight, bias, **kwargs)
        else:
            out, grads = outputs_and_grads(call, leaves, grad, poisoned=True)
        assert out.isfinite().all() and all(g.isfinite().all() for g in grads)


# --- argument errors ------------------------------------------------------------------------------------

x3, x2 = torch.randn(2, 5, 8), torch.randn(7, 8)
w, b = torch.randn(4, 8), torch.randn(4)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)

BAD_LINEAR_CALLS = [
    # (args, kwargs, error, message fragment)
    ((x3, w.numpy()), {}, TypeError, "weight must be a torch.Tensor"),
    ((x3, w[0]), {}, ValueError, r"weight must be \(N, H\) with H = 8 .* got shape \(8\)"),
    ((x3, w[:, :7]), {}, ValueError, r"weight must be \(N, H\) with H = 8 .* got shape \(4, 7\)"),
    ((x3, w[None]), {}, ValueError, r"weight must be \(N, H\)"),
    ((x3, w.double()), {}, TypeError, "weight must have x's dtype torch.float32, got torch.float64"),
    ((x3, w.to("meta")), {}, ValueError, "weight is on meta but x is on cpu"),
    ((x3, w, b.tolist()), {}, TypeError, "bias must be a torch.Tensor"),
    ((x3, w, b[:3]), {}, ValueError, r"bias must be \(N,\) = \(4,\) or None, got shape \(3\)"),
    ((x3, w, b[None]), {}, ValueError, r"bias must be \(N,\) = \(4,\) or None, got shape \(1, 4\)"),
    ((x3, w, b.half()), {}, TypeError, "bias must have x's dtype torch.float32, got torch.float16"),
    ((x3, w, b.to("meta")), {}, ValueError, "bias is on meta but x is on cpu"),
    ((x3, w), {"mode": "mean_max"}, ValueError, r"mode must be one of \('max', 'sum', 'mean'\), got 'mean_"),
    ((x3, w), {"mode": "MAX"}, ValueError, "mode must be one of"),
    ((x3, w), {"mode": MAX}, TypeError, "mode must be a str, one of .* got int"),
    ((x3, w), {"mode": None}, TypeError, "mode must be a str"),
    ((x3, w), {"activation": "softplus"}, ValueError, "activation must be None or one of .* got 'softplus'"),
    ((x3, w), {"activation": "none "}, ValueError, "activation must be None or one of"),
    ((x3, w), {"activation": torch.relu}, TypeError, "activation must be a str or None"),
    ((x3, w), {"activation": 2}, TypeError, "activation must be a str or None, got int"),
    ((x3, w, None, torch.ones(2, 4)), {}, ValueError, r"mask must be \(B, L\) = \(2, 5\)"),
    ((x3, w, None, torch.ones(2, 5, dtype=torch.complex64)), {}, TypeError, "mask must be bool, integer"),
    ((x3, w, None, torch.ones(2, 5, device="meta")), {}, ValueError, "mask is on meta but x is on cpu"),
    ((x2, w, None, torch.ones(7, dtype=torch.bool)), {"cu_seqlens": cu}, TypeError, "floating per-token"),
    ((x2, w, None, torch.ones(7).long()), {"cu_seqlens": cu}, TypeError, "floating per-token weights"),
    ((x2, w, None, torch.ones(6)), {"cu_seqlens": cu}, ValueError, r"weights of shape \(T,\) = \(7,\)"),
    ((x2, w, None, torch.ones(1, 7)), {"cu_seqlens": cu}, ValueError, r"per-token weights of shape \(T,\)"),
    ((x2, w), {}, ValueError, r"x must be \(B, L, H\) when cu_seqlens is None"),
    ((x3, w), {"cu_seqlens": cu}, ValueError, r"x must be \(T, H\) or \(1, T, H\)"),
    ((x3.long(), w.long()), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
    ((x2, w), {"cu_seqlens": cu.float()}, TypeError, "cu_seqlens must be int32 or int64"),
    ((x2, w), {"cu_seqlens": cu, "max_seqlen": -1}, ValueError, "max_seqlen must be >= 0"),
]


@pytest.mark.parametrize("backend", [None, *dict.fromkeys(p.values[0] for p in LINEAR_BACKENDS)])
@pytest.mark.parametrize("args, kwargs, error, message", BAD_LINEAR_CALLS)
def test_bad_linear_input(args, kwargs, error, message, backend):
    with pytest.raises(error, match=message):
        fused_pool.linear_pool(*args, backend=backend, **kwargs)


# --- the reference's own semantics: a per-token loop --------------------------------------------------


LOOP_ACTIVATIONS = {  # written out, not the reference's table
    None: lambda z: z,
    "relu": lambda z: torch.where(z > 0, z, 0),
    "log1p_relu": lambda z: torch.log(1 + torch.where(z > 0, z, 0)),
    "log1p_log1p_relu": lambda z: torch.log(1 + torch.log(1 + torch.where(z > 0, z, 0))),
    "gelu": lambda z: z * 0.5 * (1 + torch.erf(z / 2**0.5)),
    "tanh": lambda z: 1 - 2 / (torch.exp(2 * z) + 1),
    "silu": lambda z: z / (1 + torch.exp(-z)),
}


def loop_linear_pool(x, weight, bias, weights, mode, activation):
    """One sequence at a time, one token at a time: the definition, in float64. weights (B, L)."""
    act = LOOP_ACTIVATIONS[activation]
    rows = []
    for b in range(x.shape[0]):
        values = [
            act(x[b, t] @ weight.T + (0 if bias is None else bias))
            for t in range(x.shape[1])
            if weights[b, t]
        ]
        kept_weights = [weights[b, t] for t in range(x.shape[1]) if weights[b, t]]
        if not values:
            rows.append(torch.zeros(weight.shape[0], dtype=x.dtype))
        elif mode == "max":
            rows.append(torch.stack(values).max(0).values)
        else:
            total = sum(v * wt for v, wt in zip(values, kept_weights, strict=True))
            rows.append(total if mode == "sum" else total / sum(kept_weights))
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_per_token_loop(mode, activation):
    gen = make_generator(stable_seed("loop", mode, activation))
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    weight, bias = make_projection(5, 4, gen)
    weights = torch.rand(3, 6, generator=gen, dtype=torch.float64) + 0.5
    weights[0, ::2] = 0
    weights[1] = 0
    expected = loop_linear_pool(x, weight, bias, weights, mode, activation)
    assert_close(reference.linear_pool(x, weight, bias, weights, mode=mode, activation=activation), expected)
    # varlen: the same sequences packed; a bool mask keeps every nonzero-weight token unweighted
    kept = weights != 0
    tokens, lengths = x[kept], kept.sum(1).tolist()
    out = reference.linear_pool(
        tokens, weight, None, cu_seqlens=cu_seqlens_of(lengths), mode=mode, activation=activation
    )
    assert_close(out, loop_linear_pool(x, weight, None, kept.double(), mode, activation))


def test_reference_max_ties_and_nan():
    """The first maximal token takes the gradient; a kept NaN wins over numbers and takes it."""
    x = torch.tensor([[[1.0], [2.0], [2.0], [0.0]], [[1.0], [NAN], [3.0], [NAN]]], dtype=torch.float64)
    x.requires_grad_()
    weight = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    out = reference.linear_pool(x, weight, mode="max")
    assert out[0].tolist() == [2.0, 0.0] and out[1].isnan().all()
    (dx,) = torch.autograd.grad(out[0].sum(), x)
    # column 0 (z = x): token 1, the first of the tied 2s; column 1 (z = -x): token 3
    assert dx[0, :, 0].tolist() == [0.0, 1.0, 0.0, -1.0]
    # A NaN bias: column 0 is NaN at every token, token 0 wins it; token 1's NaN reaches no other
    # column's gradient (the (B, L, N) product's backward would spread 0 * NaN into dweight[0]).
    weight = weight.clone().requires_grad_()
    out = reference.linear_pool(x[1:, :2].detach(), weight, torch.tensor([NAN, 0.0], dtype=torch.float64))
    (dweight,) = torch.autograd.grad(out.sum(), weight)
    assert out.isnan().all() and dweight[0].item() == 1.0 and dweight[1].isnan().all()
