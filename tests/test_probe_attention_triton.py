"""The Triton probe_attention_pool kernels (triton_kernels/probe.py): outputs and the gradients of x and
probes against fused_pool.reference (float64 exact, bf16 / fp32 within twice the reference's own
error), through the public function with every allocation NaN-poisoned; padded and varlen layouts,
probe counts 1 .. 256, several channel / probe blocks, split sequences, non-finite scores, and the
launchers called directly (empty inputs, malformed cu_seqlens, determinism).
To be folded into test_probe_attention.py."""

import pytest
import torch
from helpers import (
    assert_close,
    check_attention,
    cu_seqlens_of,
    make_generator,
    make_mask,
    outputs_and_grads,
    poison_padding,
    poisoned_allocations,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.triton_kernels import probe as triton_probe
from fused_pool.triton_kernels import split_plan
from fused_pool.triton_kernels.probe import probe_attention_bwd, probe_attention_fwd

OP = "probe_attention_pool"


def _inputs(shape, num_probes, dtype, seed, x_scale=1.0):
    gen = make_generator(seed)
    x = (torch.randn(shape, generator=gen) * x_scale).to(dtype)
    probes = torch.randn(num_probes, shape[-1], generator=gen).to(dtype)
    return x, probes, gen


@pytest.fixture
def small_blocks(monkeypatch):
    """Accumulators of 512 elements: several channel blocks (and, forward, probe blocks) at small H."""
    monkeypatch.setattr(triton_probe, "ACCUMULATOR_ELEMENTS", 512)
    monkeypatch.setattr(triton_probe, "MAX_FORWARD_PROBES", 16)


@pytest.fixture
def many_chunks(monkeypatch):
    """Sequences of a few dozen rows split into chunks of 32 (the GPU splits long ones the same way)."""
    monkeypatch.setattr(split_plan, "resident_programs", lambda device: 64)
    monkeypatch.setattr(split_plan, "MIN_CHUNK_ROWS", 16)


@pytest.mark.parametrize("num_probes", [1, 3, 16, 64])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "left_padded"])
def test_padded_float64(num_probes, mask_kind):
    x, probes, gen = _inputs((3, 37, 40), num_probes, torch.float64, stable_seed(num_probes, mask_kind))
    mask = make_mask(mask_kind, 3, 37, gen)
    check_attention(OP, "triton", poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("num_probes", [1, 16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen_float64(num_probes, index_dtype):
    """Empty sequences and one of a single token, first, last and in between."""
    lengths = [0, 5, 1, 0, 31, 1]
    x, probes, _ = _inputs((sum(lengths), 24), num_probes, torch.float64, stable_seed("varlen", num_probes))
    check_attention(OP, "triton", x, probes, cu_seqlens=cu_seqlens_of(lengths, index_dtype))


@pytest.mark.parametrize("hidden", [1, 20, 70])
def test_hidden_sizes_over_several_blocks(hidden, small_blocks):
    """H = 1, H not a power of two, and (accumulators of 512) 2 probe blocks x several channel
    blocks in the forward, several channel blocks in the backward."""
    x, probes, gen = _inputs((3, 21, hidden), 19, torch.float64, stable_seed("hidden", hidden))
    mask = make_mask("bool", 3, 21, gen)
    check_attention(OP, "triton", poison_padding(x, mask), probes, mask)


def test_256_probes():
    x, probes, gen = _inputs((2, 9, 24), 256, torch.float64, 5)
    check_attention(OP, "triton", x, probes, make_mask("bool", 2, 9, gen))


def test_strided_x_and_probes():
    gen = make_generator(6)
    x = torch.randn(3, 30, 50, generator=gen, dtype=torch.float64)[:, ::2, 1::2]  # (3, 15, 25)
    probes = torch.randn(25, 4, generator=gen, dtype=torch.float64).t()  # column-major (4, 25)
    mask = torch.rand(15, 3, generator=gen).t() > 0.3  # strided mask
    check_attention(OP, "triton", poison_padding(x, mask), probes, mask)


def test_split_padded(many_chunks, small_blocks):
    plan = split_plan.plan_split(2, 2 * 150, 150, 1, 32, torch.device("cpu"))
    assert plan.split and plan.splits > 2
    x, probes, gen = _inputs((2, 150, 20), 5, torch.float64, 7)
    mask = make_mask("bool", 2, 150, gen)
    mask[0, 40:130] = False  # a chunk with no kept token between kept ones
    check_attention(OP, "triton", poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("max_seqlen", [None, 140])
def test_split_varlen(many_chunks, max_seqlen):
    lengths = [140, 0, 3, 61]
    x, probes, _ = _inputs((sum(lengths), 12), 3, torch.float64, 8)
    kwargs = dict(cu_seqlens=cu_seqlens_of(lengths), max_seqlen=max_seqlen)
    check_attention(OP, "triton", x, probes, **kwargs)


def test_large_scores_float64(many_chunks):
    """x * 100: scores of hundreds, a near one-hot softmax, across chunks (online rescaling)."""
    x, probes, gen = _inputs((2, 70, 16), 3, torch.float64, 9, x_scale=100.0)
    check_attention(OP, "triton", x, probes, make_mask("bool", 2, 70, gen))


def test_large_scores_float32(many_chunks):
    """As above in float32. The score gradient ds = p (g.x - g.out) cancels two float32 dot products
    (flash-attention's formulation): where one token takes all the weight, torch's softmax backward
    is exact by luck of rounding and the kernel is off by the dots' rounding, eps |g| |x| H. The
    gradients are held to that bound, the output to float32's tolerance."""
    x, probes, gen = _inputs((2, 70, 16), 3, torch.float32, 9, x_scale=100.0)
    mask = make_mask("bool", 2, 70, gen)
    scale = 16**-0.5
    grad = torch.randn(2, 3, 16, generator=gen)
    fused = lambda a, b: fused_pool.probe_attention_pool(a, b, mask, backend="triton")
    exact = lambda a, b: reference.probe_attention_pool(a, b, mask)
    out, (dx, dprobes) = outputs_and_grads(fused, [x, probes], grad, poisoned=True)
    exact_inputs = [x.double(), probes.double()]
    exact_out, (exact_dx, exact_dprobes) = outputs_and_grads(exact, exact_inputs, grad.double())
    assert_close(out, exact_out.float())
    rounding = torch.finfo(torch.float32).eps * 16 * grad.abs().max() * x.abs().max() * scale
    dx_bound = 4 * rounding * 3 * probes.abs().max()
    assert (dx.double() - exact_dx).abs().max() <= dx_bound
    assert (dprobes.double() - exact_dprobes).abs().max() <= 4 * rounding * 70 * x.abs().max()
    assert dx_bound < 0.01 * exact_dx.abs().max()  # the bound is far below the gradient itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("num_probes", [1, 16])
def test_low_precision(dtype, layout, num_probes):
    """Outputs within the dtype's tolerance of the reference, gradients within twice its error."""
    seed = stable_seed("low", str(dtype), layout, num_probes)
    if layout == "padded":
        x, probes, gen = _inputs((3, 33, 48), num_probes, dtype, seed)
        mask = make_mask("bool", 3, 33, gen)
        check_attention(OP, "triton", poison_padding(x, mask), probes, mask)
    else:
        lengths = [17, 0, 1, 40]
        x, probes, _ = _inputs((sum(lengths), 48), num_probes, dtype, seed)
        check_attention(OP, "triton", x, probes, cu_seqlens=cu_seqlens_of(lengths))


# --- non-finite scores: as reference.probe_attention_pool (torch.softmax) ------------------------


def _nonfinite_inputs(case):
    """x (3, 12, 8) float64 and probes (3, 8), with a mask that empties sequence 1."""
    gen = make_generator(stable_seed("nonfinite", case))
    x = torch.randn(3, 12, 8, generator=gen, dtype=torch.float64)
    probes = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1] = False
    scale = None
    if case == "nan_token":
        x[0, 3, 2] = float("nan")  # every probe of sequence 0: NaN
    elif case == "inf_scale":
        # Probe 0 scores every token below 0 (all -inf: empty, 0), probe 1 above 0 (+inf: NaN).
        x = x.abs() + 0.1
        probes[0], probes[1] = -probes[0].abs(), probes[1].abs()
        scale = float("inf")
    elif case == "nan_scale":
        scale = float("nan")
    elif case == "zero_scale":
        scale = 0.0  # uniform weights: the mean
    elif case == "inf_token":
        x[2, 5, 0] = float("inf")  # scores +-inf: NaN where +inf, p = 0 (but 0 * inf) where -inf
    return x, probes, mask, scale


@pytest.mark.parametrize("case", ["nan_token", "inf_scale", "nan_scale", "zero_scale", "inf_token"])
def test_nonfinite_scores(case):
    x, probes, mask, scale = _nonfinite_inputs(case)
    out, _ = check_attention(OP, "triton", poison_padding(x, mask), probes, mask, scale=scale)
    assert not out[1].any()  # the empty sequence: 0, whatever else is NaN


# --- the launchers called directly ---------------------------------------------------------------


def test_poisoned_outputs_are_all_written():
    """probe_attention_fwd / _bwd into NaN-filled allocations: out, stats, dx and dprobes hold no NaN
    (an empty sequence: out 0, stats (-inf, 0); tokens not kept: dx 0)."""
    x, probes, gen = _inputs((3, 20, 12), 5, torch.float32, 10)
    mask = make_mask("bool", 3, 20, gen)
    x = poison_padding(x, mask)
    with poisoned_allocations():
        out, stats = probe_attention_fwd(x, probes, mask, None, None, 0.5)
        grad = torch.randn(out.shape, generator=gen)
        dx, dprobes = probe_attention_bwd(grad, x, probes, mask, None, out, stats, 0.5)
    assert not out.isnan().any() and not dx.isnan().any() and not dprobes.isnan().any()
    assert not out[1].any() and stats[1, :, 1].eq(0).all() and stats[1, :, 0].eq(float("-inf")).all()
    assert not dx[mask == 0].any()
    assert_close(out.to(x.dtype), reference.probe_attention_pool(x, probes, mask, scale=0.5))


def test_malformed_cu_seqlens_stay_in_bounds():
    """cu_seqlens past T, decreasing and short of T: segments are clamped, rows in no sequence get
    dx = 0, nothing is read or written out of bounds."""
    x, probes, gen = _inputs((10, 6), 2, torch.float64, 11)
    cu_seqlens = torch.tensor([2, 5, 3, 8, 40])
    out, stats = probe_attention_fwd(x, probes, None, cu_seqlens, None, 1.0)
    dx, dprobes = probe_attention_bwd(torch.ones_like(out), x, probes, None, cu_seqlens, out, stats, 1.0)
    # Clamped segments: [2, 5), [5, 5), [3, 8), [8, 10).
    for seq, (start, end) in enumerate([(2, 5), (5, 5), (3, 8), (8, 10)]):
        cu = torch.tensor([0, end - start])
        expected = reference.probe_attention_pool(x[start:end], probes, cu_seqlens=cu, scale=1.0)
        assert_close(out[seq], expected[0])
    assert not dx[:2].any()


def test_empty_inputs():
    probes = torch.randn(3, 4)
    out, stats = probe_attention_fwd(torch.randn(0, 4), probes, None, torch.tensor([0]), None, 1.0)
    assert out.shape == (0, 3, 4) and stats.shape == (0, 3, 2)
    out, stats = probe_attention_fwd(torch.randn(0, 4), probes, None, torch.tensor([0, 0, 0]), None, 1.0)
    assert out.shape == (2, 3, 4) and not out.any()
    dx, dprobes = probe_attention_bwd(
        torch.randn(2, 3, 4), torch.randn(0, 4), probes, None, torch.tensor([0, 0, 0]), out, stats, 1.0
    )
    assert dx.shape == (0, 4) and dprobes.shape == (3, 4) and not dprobes.any()


def test_deterministic(many_chunks):
    x, probes, gen = _inputs((2, 100, 20), 4, torch.float32, 12)
    results = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(), probes.clone().requires_grad_()]
        out = fused_pool.probe_attention_pool(*leaves, backend="triton")
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)
