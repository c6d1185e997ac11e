"""The extension's linear ops called directly (torch.ops.fused_pool.ext_linear_fwd / ext_linear_bwd),
against fused_pool.reference.linear_pool in float64: every mode and activation, padded and varlen
batches, forced token blocks shorter than a sequence or holding several, NaN padding, ties,
malformed cu_seqlens, determinism."""

import pytest
import torch
from helpers import (
    EXTENSION_DEVICES,
    TOLERANCES,
    assert_within_reference_error,
    cu_seqlens_of,
    make_generator,
    make_mask,
    needs_extension,
    poison_padding,
    stable_seed,
)

from fused_pool import reference
from fused_pool.contract import ACTIVATIONS, MAX, MEAN, SUM

ops = torch.ops.fused_pool
MODES = {"max": MAX, "sum": SUM, "mean": MEAN}
pytestmark = needs_extension


def run_ext(x, weight, bias, mask, cu_seqlens, mode, activation, grad):
    """(out, (dx, dweight, dbias)) of the ext ops (dbias None without a bias)."""
    out, den, argmax = ops.ext_linear_fwd(x, weight, bias, mask, cu_seqlens, None, MODES[mode], activation)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert out.dtype == x.dtype and out.is_contiguous() and den.dtype == acc and argmax.dtype == torch.int32
    grads = ops.ext_linear_bwd(grad, x, weight, bias, mask, cu_seqlens, den, argmax, MODES[mode], activation)
    return out, grads, (den, argmax)


def run_reference(x, weight, bias, mask, cu_seqlens, mode, activation, grad, dtype=None):
    """reference.linear_pool and its gradients, with the inputs cast to `dtype` (default: theirs)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, weight, bias) if t is not None]
    w_mask = mask if mask is None or not mask.is_floating_point() else mask.to(dtype or mask.dtype)
    out = reference.linear_pool(
        leaves[0],
        leaves[1],
        leaves[2] if bias is not None else None,
        w_mask,
        cu_seqlens=cu_seqlens,
        mode=mode,
        activation=ACTIVATIONS[activation],
    )
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out.detach(), grads


def check(x, weight, bias, mask, mode, activation, cu_seqlens=None, device="cpu", seed=0):
    """The ext ops on `device` against the reference at x's precision and in float64."""
    dev = lambda t: None if t is None else t.to(device)
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    grad = torch.randn(batch, weight.shape[0], generator=make_generator(seed)).to(x.dtype)
    out, grads, _ = run_ext(
        dev(x), dev(weight), dev(bias), dev(mask), dev(cu_seqlens), mode, activation, dev(grad)
    )
    ref_out, ref_grads = run_reference(x, weight, bias, mask, cu_seqlens, mode, activation, grad)
    exact_out, exact_grads = run_reference(
        x, weight, bias, mask, cu_seqlens, mode, activation, grad, torch.float64
    )
    torch.testing.assert_close(out.cpu(), exact_out.to(x.dtype), equal_nan=True, **TOLERANCES[x.dtype])
    sources = (x, weight) if bias is None else (x, weight, bias)
    if bias is None:
        assert grads[2].shape == (weight.shape[0],)
    checked = zip(grads[: len(sources)], ref_grads, exact_grads, sources, strict=True)
    for actual, expected, exact, source in checked:
        assert actual.shape == source.shape and actual.dtype == source.dtype
        assert_within_reference_error(actual.cpu(), expected, exact, x.dtype)
    return out, grads


def inputs(batch, length, hidden, features, dtype, seed, bias=True, strided=False):
    gen = make_generator(seed)
    x = torch.randn(batch, length, 2 * hidden if strided else hidden, generator=gen)
    x = (x[..., ::2] if strided else x).to(dtype)
    weight = (torch.randn(features, hidden, generator=gen) / hidden**0.5).to(dtype)
    b = (torch.randn(features, generator=gen) * 0.5).to(dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", range(len(ACTIVATIONS)), ids=list(ACTIVATIONS))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "left_padded"])
def test_padded_float64(device, mode, activation, mask_kind):
    seed = stable_seed(mode, activation, mask_kind)
    x, weight, bias = inputs(4, 9, 6, 13, torch.float64, seed)
    mask = make_mask(mask_kind, 4, 9, make_generator(seed))
    check(poison_padding(x, mask), weight, bias, mask, mode, activation, device=device, seed=seed)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", [0, 2, 4])
def test_low_precision(device, dtype, mode, activation):
    seed = stable_seed(str(dtype), mode, activation)
    x, weight, bias = inputs(3, 20, 24, 40, dtype, seed)
    mask = make_mask("int", 3, 20, make_generator(seed))
    check(poison_padding(x, mask), weight, bias, mask, mode, activation, device=device, seed=seed)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
def test_varlen(device, mode, index_dtype, weighted):
    """Empty sequences, a single token, cu_seqlens as a strided view, trailing tokens in no sequence
    (NaN: never read), per-token float weights."""
    seed = stable_seed(mode, str(index_dtype), weighted)
    gen = make_generator(seed)
    lengths = [3, 0, 1, 7, 0, 5]
    num_tokens = sum(lengths) + 2
    x = torch.randn(num_tokens, 5, generator=gen, dtype=torch.float64)
    x[-2:] = float("nan")
    weight = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(9, generator=gen, dtype=torch.float64)
    cu = cu_seqlens_of(lengths, index_dtype)
    cu = torch.stack([cu, cu]).t()[:, 0]  # stride 2
    mask = torch.rand(num_tokens, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    check(x, weight, bias, mask, mode, 2, cu_seqlens=cu, device=device, seed=seed)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_rows", ["1", "3", "64"])
def test_forced_blocks(device, mode, block_rows, monkeypatch):
    """Blocks shorter than a sequence (several per sequence) and blocks holding several sequences."""
    monkeypatch.setenv("FUSED_POOL_LINEAR_BLOCK_ROWS", block_rows)
    seed = stable_seed(mode, block_rows)
    x, weight, bias = inputs(5, 23, 7, 17, torch.float64, seed)
    mask = make_mask("bool", 5, 23, make_generator(seed))
    check(poison_padding(x, mask), weight, bias, mask, mode, 2, device=device, seed=seed)
    cu = cu_seqlens_of([1, 2, 40, 0, 3])
    xv = torch.randn(46, 7, generator=make_generator(seed), dtype=torch.float64)
    check(xv, weight, None, None, mode, 6, cu_seqlens=cu, device=device, seed=seed)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_odd_shapes_and_strides(device, mode):
    """H = 1, no bias, non-contiguous x (strided channels, permuted batch) and weight, N = 1."""
    seed = stable_seed("odd", mode)
    x, weight, _ = inputs(3, 5, 1, 4, torch.float64, seed)
    check(x, weight, None, None, mode, 1, device=device, seed=seed)
    x, weight, bias = inputs(4, 6, 8, 11, torch.float64, seed, strided=True)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, L, H) with stride_b < stride_l
    weight_t = weight.t().contiguous().t()
    mask = make_mask("bool", 4, 6, make_generator(seed))
    check(x, weight_t, bias, mask, mode, 4, device=device, seed=seed)
    x, weight, bias = inputs(2, 3, 5, 1, torch.float64, seed)
    check(x, weight, bias, None, mode, 5, device=device, seed=seed)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_max_ties_go_to_the_first_token(device, monkeypatch):
    """Integer inputs: many exact ties; the gradient goes to the first maximal kept token, across
    block boundaries too."""
    monkeypatch.setenv("FUSED_POOL_LINEAR_BLOCK_ROWS", "2")
    gen = make_generator(3)
    x = torch.randint(-1, 2, (3, 11, 4), generator=gen).double()
    weight = torch.randint(-1, 2, (6, 4), generator=gen).double()
    check(x, weight, None, None, "max", 1, device=device)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_kept_nan_wins_the_max(device):
    x, weight, bias = inputs(2, 6, 3, 5, torch.float64, 4)
    x[0, 3, 1] = float("nan")
    out, (dx, dweight, _), (_, argmax) = run_ext(
        x.to(device),
        weight.to(device),
        bias.to(device),
        None,
        None,
        "max",
        0,
        torch.ones(2, 5).double().to(device),
    )
    assert out[0].isnan().all() and not out[1].isnan().any()
    assert torch.equal(argmax[0].cpu(), torch.full((5,), 3, dtype=torch.int32))


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_deterministic(device, mode, monkeypatch):
    monkeypatch.setenv("FUSED_POOL_LINEAR_BLOCK_ROWS", "16")
    x, weight, bias = inputs(6, 40, 32, 300, torch.float32, 5)
    mask = make_mask("float", 6, 40, make_generator(5))
    grad = torch.randn(6, 300, generator=make_generator(6))
    args = [t.to(device) for t in (x, weight, bias, mask)]
    first = run_ext(*args, None, mode, 2, grad.to(device))
    second = run_ext(*args, None, mode, 2, grad.to(device))
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("cu", [[0, 5, 3, 9], [-4, 2, 99, 6], [7, 7, 0, 12], [0, 100]])
def test_malformed_cu_seqlens_stay_in_bounds(device, cu):
    """Decreasing, negative, beyond-T values: no crash, finite results, and the same numbers as the
    torch backend (a row belongs to at most one sequence)."""
    from fused_pool.torch_linear import linear_bwd, linear_fwd

    gen = make_generator(8)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    grad = torch.randn(len(cu) - 1, 6, generator=gen, dtype=torch.float64)
    for mode in MODES.values():
        expected = linear_fwd(x, weight, None, None, cu_seqlens, None, mode, 2)
        got = ops.ext_linear_fwd(
            x.to(device), weight.to(device), None, None, cu_seqlens.to(device), None, mode, 2
        )
        torch.testing.assert_close(got[0].cpu(), expected[0], rtol=1e-12, atol=1e-12)
        grads = ops.ext_linear_bwd(
            grad.to(device),
            x.to(device),
            weight.to(device),
            None,
            None,
            cu_seqlens.to(device),
            *got[1:],
            mode,
            2,
        )
        expected_grads = linear_bwd(grad, x, weight, None, None, cu_seqlens, *expected[1:], mode, 2)
        for a, b in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_empty_inputs(device):
    weight = torch.randn(5, 3, device=device)
    out, den, argmax = ops.ext_linear_fwd(
        torch.randn(2, 0, 3, device=device), weight, None, None, None, None, MAX, 2
    )
    assert torch.equal(out.cpu(), torch.zeros(2, 5)) and torch.equal(
        argmax.cpu(), torch.full((2, 5), -1).int()
    )
    cu = torch.zeros(3, dtype=torch.int64, device=device)
    out, den, argmax = ops.ext_linear_fwd(
        torch.randn(0, 3, device=device), weight, None, None, cu, None, MEAN, 0
    )
    assert torch.equal(out.cpu(), torch.zeros(2, 5)) and torch.equal(den.cpu(), torch.zeros(2))
    dx, dweight, dbias = ops.ext_linear_bwd(
        out, torch.randn(0, 3, device=device), weight, None, None, cu, den, argmax, MEAN, 0
    )
    assert dx.shape == (0, 3) and torch.equal(dweight.cpu(), torch.zeros(5, 3)) and dbias.shape == (5,)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda x, w: ops.ext_linear_fwd(x, w[:, :2], None, None, None, None, MAX, 0),
            "weight must be \\(N, H\\)",
        ),
        (
            lambda x, w: ops.ext_linear_fwd(x, w.double(), None, None, None, None, MAX, 0),
            "weight must be Float",
        ),
        (lambda x, w: ops.ext_linear_fwd(x, w, w[0], None, None, None, MAX, 0), "bias must be \\(N,\\)"),
        (lambda x, w: ops.ext_linear_fwd(x, w, None, None, None, None, 3, 0), "mode must be 2"),
        (lambda x, w: ops.ext_linear_fwd(x, w, None, None, None, None, MAX, 7), "activation must be"),
        (
            lambda x, w: ops.ext_linear_fwd(x, w, None, torch.ones(2, 5), None, None, MAX, 0),
            "mask must be \\(B, L\\)",
        ),
        (
            lambda x, w: ops.ext_linear_bwd(
                torch.ones(2, 4), x, w, None, None, None, torch.ones(0), torch.zeros(2, 4).int(), MAX, 0
            ),
            "grad_out must be \\(B, N\\)",
        ),
        (
            lambda x, w: ops.ext_linear_bwd(
                torch.ones(2, 5), x, w, None, None, None, torch.ones(0), torch.zeros(2, 4).int(), MAX, 0
            ),
            "argmax must be \\(B, N\\)",
        ),
    ],
)
def test_argument_checks_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(2, 3, 4), torch.randn(5, 4))
