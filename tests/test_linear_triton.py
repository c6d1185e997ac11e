"""linear_pool on the Triton backend (triton_kernels/linear.py): outputs and the gradients of x, weight
and bias against fused_pool.reference in float64, every mode and activation, padded and varlen,
through the public function with every allocation NaN-poisoned (an unwritten element shows). Small
tiles (16 x 16 x 16) give several token, output and H blocks at interpreter-friendly sizes."""

import pytest
import torch
from helpers import (
    MASKS,
    TOLERANCES,
    assert_close,
    cu_seqlens_of,
    make_generator,
    make_mask,
    outputs_and_grads,
    poison_padding,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.contract import ACTIVATIONS, MAX, SUM
from fused_pool.triton_kernels import linear as triton_linear
from fused_pool.triton_kernels import split_plan

MODES = ("max", "sum", "mean")
SMALL = triton_linear.Tiles(16, 16, 16, 4)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_linear, "forward_tiles", lambda dtype: SMALL)
    monkeypatch.setattr(triton_linear, "backward_tiles", lambda dtype: SMALL)
    monkeypatch.setattr(triton_linear, "MAX_DZ_BLOCKS", (16, 8))
    monkeypatch.setattr(triton_linear, "MAX_DWEIGHT_BLOCKS", (16, 8))
    monkeypatch.setattr(triton_linear, "MAX_DX_BLOCKS", (2, 8))  # rows that won many outputs: 2 per step


def make_projection(hidden, features, dtype, gen, bias=True):
    weight = (torch.randn(features, hidden, generator=gen) / hidden**0.5).to(dtype)
    return weight, (torch.randn(features, generator=gen).to(dtype) if bias else None)


def check(x, weight, bias, mask=None, cu_seqlens=None, mode="max", activation=None, seed=0, **kwargs):
    """Output and gradients against the float64 reference, at x's dtype's tolerance."""
    inputs = [t for t in (x, weight, bias) if t is not None]

    def pool(fn, *leaves, **extra):
        b = leaves[2] if bias is not None else None
        return fn(
            leaves[0], leaves[1], b, mask, cu_seqlens=cu_seqlens, mode=mode, activation=activation, **extra
        )

    exact_inputs = [t.double() for t in inputs]
    exact = pool(reference.linear_pool, *exact_inputs)
    grad = torch.randn(exact.shape, generator=make_generator(seed)).to(x.dtype)
    exact, exact_grads = outputs_and_grads(
        lambda *t: pool(reference.linear_pool, *t), exact_inputs, grad.double()
    )
    out, grads = outputs_and_grads(
        lambda *t: pool(fused_pool.linear_pool, *t, backend="triton", **kwargs), inputs, grad, poisoned=True
    )
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert_close(out, exact.to(x.dtype), dtype=x.dtype)
    for actual, expected, source in zip(grads, exact_grads, inputs, strict=True):
        assert actual.shape == source.shape and actual.dtype == source.dtype
        # A gradient is a sum over tokens or outputs of products with dz, which the 16-bit kernels
        # round to x's dtype for the tensor-core dot (as autograd's own F.linear backward does): its
        # error is relative to the gradient's scale, not to each (possibly cancelled) element.
        scale = max(1.0, expected.abs().max().item()) if x.dtype in (torch.bfloat16, torch.float16) else 1.0
        tolerance = TOLERANCES[x.dtype]
        assert_close(
            actual, expected.to(source.dtype), atol=tolerance["atol"] * scale, rtol=tolerance["rtol"]
        )
    return out, grads


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_activation(mode, activation, small_tiles):
    gen = make_generator(stable_seed("linear", mode, activation))
    x = torch.randn(3, 21, 12, generator=gen, dtype=torch.float64)  # L, H, N: not multiples of 16
    weight, bias = make_projection(12, 20, torch.float64, gen)
    mask = make_mask("float", 3, 21, gen)
    check(poison_padding(x, mask), weight, bias, mask, mode=mode, activation=activation)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_masks(mode, mask_kind, dtype, small_tiles):
    gen = make_generator(stable_seed("padded", mode, mask_kind, str(dtype)))
    x = torch.randn(3, 19, 24, generator=gen).to(dtype)
    weight, bias = make_projection(24, 33, dtype, gen)
    mask = make_mask(mask_kind, 3, 19, gen)
    check(poison_padding(x, mask), weight, bias, mask, mode=mode, activation="log1p_relu")


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_varlen(mode, weights, cu_dtype, small_tiles):
    """Empty sequences (first, middle, last) and one of length 1; per-token weights or none."""
    gen = make_generator(stable_seed("varlen", mode, weights, str(cu_dtype)))
    lengths = [0, 7, 1, 0, 20, 0]
    cu_seqlens = cu_seqlens_of(lengths, dtype=cu_dtype)
    x = torch.randn(sum(lengths), 10, generator=gen)
    weight, bias = make_projection(10, 18, torch.float32, gen)
    mask = None
    if weights:
        mask = torch.where(
            torch.rand(x.shape[0], generator=gen) > 0.3, torch.rand(x.shape[0], generator=gen) + 0.2, 0.0
        )
    out, _ = check(x, weight, bias, mask, cu_seqlens, mode=mode, activation="gelu")
    assert not out[[0, 3, 5]].any()


@pytest.mark.parametrize("mode", MODES)
def test_default_tiles_bf16_and_fp32(mode):
    """The launchers' own tiles (64 x 128 x 32 / 64), N past one block, H not a power of two."""
    gen = make_generator(stable_seed("default", mode))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 70, 40, generator=gen).to(dtype)
        weight, bias = make_projection(40, 150, dtype, gen)
        mask = make_mask("bool", 2, 70, gen)
        check(poison_padding(x, mask), weight, bias, mask, mode=mode, activation="log1p_relu")


@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs_no_bias_and_one_channel(mode, small_tiles):
    gen = make_generator(stable_seed("strided", mode))
    x = torch.randn(2, 17, 26, generator=gen)[:, :, ::2]  # H = 13, stride 2
    weight = torch.randn(13, 19, generator=gen).t()  # column-major (N, H)
    mask = make_mask("int", 2, 17, gen)
    check(poison_padding(x, mask), weight, None, mask, mode=mode, activation="silu")
    bias = torch.randn(38, generator=gen)[::2]
    x1 = torch.randn(3, 5, 1, generator=gen)  # H = 1
    check(x1, torch.randn(19, 1, generator=gen), bias, mode=mode, activation="tanh")


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_long_sequences_split_over_programs(mode, varlen, small_tiles):
    """Few long sequences are split into chunks folded in order; ties across chunks: the first wins."""
    plan = split_plan.plan_split(1, 300, 300, 2, 16, torch.device("cpu"))
    assert plan.split and plan.splits > 1
    gen = make_generator(stable_seed("split", mode, varlen))
    x = torch.randn(2, 300, 6, generator=gen)
    x[:, 200] = x[:, 10]  # the same token twice, far apart: an exact tie for every output
    weight, bias = make_projection(6, 20, torch.float32, gen)
    if varlen:
        check(x[0], weight, bias, None, cu_seqlens_of([0, 290, 10]), mode=mode, activation="relu")
    else:
        mask = make_mask("float", 2, 300, gen)
        mask[:, 10] = mask[:, 200] = 1.0
        check(poison_padding(x, mask), weight, bias, mask, mode=mode, activation="relu")


def test_max_state_ties_nan_and_empty():
    """argmax is the first maximal kept token (index within its sequence), -1 for an empty sequence;
    a kept NaN wins; den is the sum of weights."""
    gen = make_generator(5)
    x = torch.randn(3, 40, 4, generator=gen, dtype=torch.float64)
    x[0, 30] = x[0, 5]  # a tie: token 5 wins
    x[2, 12, 1] = float("nan")
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1] = False
    mask[0, :5] = False
    weight, bias = make_projection(4, 9, torch.float64, gen)
    out, _, argmax = triton_linear.linear_fwd(x, weight, bias, mask, None, None, MAX, 0)
    z = x @ weight.T + bias
    expected = torch.where(mask[..., None], z, float("-inf")).argmax(1).int()
    expected[1] = -1
    expected[2] = 12
    assert torch.equal(argmax, expected)
    assert out[2].isnan().all() and not out[1].any()
    _, den, argmax = triton_linear.linear_fwd(x, weight, bias, mask.double() * 0.5, None, None, 1, 0)
    assert den.tolist() == [17.5, 0.0, 20.0] and argmax.shape == (0,)
    _, den, _ = triton_linear.linear_fwd(x, weight, bias, mask, None, None, SUM, 0)
    assert den.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_empty_inputs(mode, small_tiles):
    gen = make_generator(stable_seed("determinism", mode))
    x = torch.randn(2, 40, 16, generator=gen)
    x[:, 20:] = x[:, :20]  # every winner tied with a later copy
    weight, bias = make_projection(16, 40, torch.float32, gen)
    runs = [check(x, weight, bias, mode=mode, activation="log1p_relu") for _ in range(2)]
    for first, second in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]], strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("mode", MODES)
def test_no_tokens_and_no_outputs(mode):
    """T = 0 (every sequence empty) pools to 0 with zero gradients; N = 0 gives (B, 0)."""
    gen = make_generator(stable_seed("empty", mode))
    weight, bias = make_projection(16, 40, torch.float32, gen)
    x = torch.randn(0, 16, generator=gen)
    grad = torch.randn(2, 40, generator=gen)
    pool = lambda *t: fused_pool.linear_pool(
        *t, cu_seqlens=cu_seqlens_of([0, 0]), mode=mode, backend="triton"
    )
    out, (dx, dweight, dbias) = outputs_and_grads(pool, [x, weight, bias], grad, poisoned=True)
    assert out.shape == (2, 40) and not out.any()
    assert dx.shape == (0, 16) and not dweight.any() and not dbias.any()
    x = torch.randn(2, 5, 16, generator=gen)
    pool = lambda *t: fused_pool.linear_pool(*t, mode=mode, backend="triton")
    out, (dx, dweight, dbias) = outputs_and_grads(
        pool, [x, weight[:0], bias[:0]], torch.zeros(2, 0), poisoned=True
    )
    assert out.shape == (2, 0) and dweight.shape == (0, 16) and dbias.shape == (0,) and not dx.any()
    # H = 0: z is the bias.
    check(
        torch.randn(2, 5, 0, generator=gen),
        torch.randn(7, 0, generator=gen),
        bias[:7],
        mode=mode,
        activation="gelu",
    )
