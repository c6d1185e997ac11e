"""probe_attention_pool (issue 23) on every backend that has its kernels here (helpers.kernel_backends)
against fused_pool.reference in float64: outputs (poisoned allocations) and the gradients of x and
probes for P = 1 .. 256, every mask kind with NaN padding, varlen (int32 / int64 / strided
cu_seqlens, (1, T, H), empty and one-token sequences), odd shapes, strided inputs, the scale
argument, large scores, non-finite scores, split sequences, determinism; the fold of a key
projection into a probe (the identity fused_pool.nn.MAPHead rests on); the argument errors.
torch.compile: test_compile.py; double backward: test_double_backward.py; Hypothesis cases:
test_differential.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ERROR_FLOOR,
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

BACKENDS = kernel_backends("probe_attention")
NAN, INF = float("nan"), float("inf")
PROBE_COUNTS = [1, 2, 7, 16, 64]


def call(backend, x, probes, mask=None, **kwargs):
    return fused_pool.probe_attention_pool(x, probes, mask, backend=backend, **kwargs)


def make_probes(num_probes, hidden, dtype, device, gen, scale=2.0):
    return (torch.randn(num_probes, hidden, generator=gen) * scale).to(device, dtype)


def _empty_rows(x, mask, cu_seqlens):
    """(B,) bool: the sequences with no kept token."""
    if cu_seqlens is not None:
        return cu_seqlens[1:] <= cu_seqlens[:-1]
    if mask is None:
        return torch.full((x.shape[0],), x.shape[1] == 0, device=x.device)
    return ~(mask != 0).any(1)


def check_probe(backend, x, probes, mask=None, seed=0, floor_factors=None, **kwargs):
    """Output against the float64 reference rounded to x's dtype; the gradients of x and probes
    within twice the error of the reference run at the inputs' precision plus a floor (for dprobes
    times sqrt(T): it sums every token); padding's dx and an empty sequence's output and dx exactly
    0. `floor_factors` (out, dx, dprobes) widen the floors for large scores, and the output is then
    held to the same rule as the gradients. Returns (out, (dx, dprobes))."""
    ref = lambda a, b: reference.probe_attention_pool(a, b, mask, **kwargs)
    fused = lambda a, b: call(backend, a, b, mask, **kwargs)
    grad = random_like_output(ref(x, probes).shape, x.dtype, x.device, seed)
    low_out, low_grads = outputs_and_grads(ref, [x, probes], grad)
    exact_out, exact_grads = outputs_and_grads(ref, [x.double(), probes.double()], grad.double())
    out, grads = outputs_and_grads(fused, [x, probes], grad, poisoned=True)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == exact_out.shape
    dtype = max(x.dtype, probes.dtype, key=lambda d: torch.finfo(d).eps)
    factors = floor_factors or (1.0, 1.0, 1.0)
    if floor_factors is None:
        assert_close(out, exact_out.to(x.dtype), dtype=x.dtype)
    else:
        assert_within_reference_error(out, low_out, exact_out, dtype, factors[0])
    num_tokens = x.shape[:-1].numel()
    for actual, low, exact, source, factor in zip(
        grads, low_grads, exact_grads, (x, probes), (factors[1], factors[2] * num_tokens**0.5), strict=True
    ):
        assert actual.shape == source.shape and actual.dtype == source.dtype
        assert_within_reference_error(actual, low, exact, dtype, factor)
    dx = grads[0]
    empty = _empty_rows(x, mask, kwargs.get("cu_seqlens"))
    if kwargs.get("cu_seqlens") is None:
        assert not out[empty].any() and not dx[empty].any()
        if mask is not None:
            assert not dx[mask == 0].any()
    else:
        assert not out[empty].any()
    return out, grads


# --- padded and varlen, every probe count ------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_probes", PROBE_COUNTS)
def test_padded(num_probes, mask_kind, dtype, backend, device):
    """B = 3 with an empty and a one-token sequence (make_mask), H = 40, NaN in the padding."""
    gen = make_generator(stable_seed("probe padded", num_probes, mask_kind, str(dtype)))
    x = torch.randn(3, 37, 40, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, 3, 37, gen)
    mask = mask if mask is None else mask.to(device)
    probes = make_probes(num_probes, 40, dtype, device, gen)
    out, _ = check_probe(backend, poison_padding(x, mask), probes, mask)
    assert not out.isnan().any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype, probes_dtype",
    [
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
def test_dtypes(x_dtype, probes_dtype, backend, device):
    gen = make_generator(stable_seed("probe dtypes", str(x_dtype), str(probes_dtype)))
    x = torch.randn(3, 21, 24, generator=gen).to(device, x_dtype)
    mask = make_mask("bool", 3, 21, gen).to(device)
    probes = make_probes(5, 24, probes_dtype, device, gen)
    check_probe(backend, poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["tokens", "batch_dim"])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("num_probes", PROBE_COUNTS)
def test_varlen(num_probes, cu_dtype, layout, backend, device):
    """(T, H) or (1, T, H), empty and one-token sequences; bf16 with int64 cu_seqlens and a
    max_seqlen hint."""
    lengths = [5, 0, 1, 37, 2, 0]
    dtype = torch.float32 if cu_dtype == torch.int32 else torch.bfloat16
    gen = make_generator(stable_seed("probe varlen", num_probes, str(cu_dtype), layout))
    x = torch.randn(sum(lengths), 40, generator=gen).to(device, dtype)
    if layout == "batch_dim":
        x = x[None]
    probes = make_probes(num_probes, 40, dtype, device, gen)
    max_seqlen = None if cu_dtype == torch.int32 else 37
    cu_seqlens = cu_seqlens_of(lengths, cu_dtype, device)
    out, _ = check_probe(backend, x, probes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    assert out.shape == (len(lengths), num_probes, 40)


def _strided_view(cu: torch.Tensor) -> torch.Tensor:
    """cu as every other element of a storage whose elements in between are other boundaries."""
    storage = torch.empty(2 * cu.numel() - 1, dtype=cu.dtype, device=cu.device)
    storage[::2] = cu
    storage[1::2] = cu[-1] - cu[1:]
    return storage[::2]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_strided_cu_seqlens_views(cu_dtype, backend, device):
    gen = make_generator(stable_seed("probe cu views", str(cu_dtype)))
    lengths = [3, 0, 9, 1, 6]
    x = torch.randn(sum(lengths), 16, generator=gen).to(device)
    probes = make_probes(3, 16, torch.float32, device, gen)
    cu = _strided_view(cu_seqlens_of(lengths, cu_dtype, device))
    assert cu.stride() == (2,)
    check_probe(backend, x, probes, cu_seqlens=cu)
    zeros = torch.tensor([0, 3, 7, 9], dtype=cu_dtype, device=device)[:1].expand(4)  # 3 empty ones
    out, (dx, dprobes) = check_probe(backend, x, probes, cu_seqlens=zeros)
    assert out.shape == (3, 3, 16) and not out.any() and not dx.any() and not dprobes.any()


# --- shapes, strides, split sequences ---------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("num_probes", [1, 7])
@pytest.mark.parametrize(
    "shape", [(1, 1, 4), (2, 1, 8), (3, 9, 1), (2, 13, 3), (2, 11, 130), (2, 6, 1152)], ids=str
)
def test_shapes(shape, num_probes, backend, device):
    """L = 1, H = 1, H not a power of two, H wider than one tile (1152: SigLIP so400m)."""
    gen = make_generator(stable_seed("probe shapes", shape, num_probes))
    batch, length, hidden = shape
    x = torch.randn(shape, generator=gen).to(device)
    mask = (torch.rand(batch, length, generator=gen) > 0.3).to(device)
    mask[0, 0] = True
    probes = make_probes(num_probes, hidden, torch.float32, device, gen)
    check_probe(backend, poison_padding(x, mask), probes, mask)
    check_probe(backend, x, probes)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_zero_hidden(layout, backend, device):
    """H = 0: (B, P, 0) outputs and a backward that runs, whatever the scale."""
    gen = make_generator(19)
    probes = torch.randn(3, 0).to(device)
    mask, kwargs = None, {}
    if layout == "padded":
        x, mask = torch.randn(2, 5, 0).to(device), make_mask("bool", 2, 5, gen).to(device)
    else:
        x, kwargs = torch.randn(5, 0).to(device), dict(cu_seqlens=cu_seqlens_of([2, 0, 3], device=device))
    for scale in (None, 2.0):
        out, (dx, dprobes) = check_probe(backend, x, probes, mask, scale=scale, **kwargs)
        assert out.shape == (2 if layout == "padded" else 3, 3, 0) and dx.shape == x.shape


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_most_probes(backend, device):
    """P = 256, the largest allowed, padded and varlen."""
    gen = make_generator(256)
    x = torch.randn(3, 6, 8, generator=gen).to(device)
    mask = make_mask("bool", 3, 6, gen).to(device)
    probes = make_probes(256, 8, torch.float32, device, gen)
    check_probe(backend, poison_padding(x, mask), probes, mask)
    check_probe(backend, x[0], probes, cu_seqlens=cu_seqlens_of([2, 0, 4], device=device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_strided_inputs(backend, device):
    """Transposed and sliced x, a transposed mask, probes that are a column slice of a transpose or
    one probe expanded (stride 0), padded and varlen."""
    gen = make_generator(12)
    x = torch.randn(37, 3, 80, generator=gen).to(device)[..., ::2].transpose(0, 1)
    mask = (torch.rand(37, 3, generator=gen) > 0.3).to(device).T
    probes = torch.randn(40, 14, generator=gen).to(device).T[::2]
    assert not x.is_contiguous() and not mask.is_contiguous() and not probes.is_contiguous()
    check_probe(backend, poison_padding(x, mask), probes, mask)
    expanded_x = torch.randn(1, 37, 40, generator=gen).to(device).expand(3, 37, 40)
    check_probe(backend, expanded_x, probes, mask)
    tokens = torch.randn(23, 81, generator=gen).to(device)[:, 1::2]
    one_probe = torch.randn(1, 40, generator=gen).to(device).expand(4, 40)
    check_probe(backend, tokens, one_probe, cu_seqlens=cu_seqlens_of([9, 0, 14], device=device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_split_sequences(backend, device):
    """Sequences long enough to be split over programs (triton) / chunks (cpu: 2048 rows) and
    combined."""
    gen = make_generator(2100)
    x = torch.randn(2, 2100, 16, generator=gen).to(device)
    mask = torch.rand(2, 2100, generator=gen).to(device) * (torch.rand(2, 2100, generator=gen) > 0.2).to(
        device
    )
    probes = make_probes(3, 16, torch.float32, device, gen)
    check_probe(backend, poison_padding(x, mask), probes, mask)
    lengths = [2100, 0, 7, 700]
    tokens = torch.randn(sum(lengths), 16, generator=gen).to(device, torch.bfloat16)
    check_probe(backend, tokens, probes.bfloat16(), cu_seqlens=cu_seqlens_of(lengths, device=device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_float_mask_keeps_every_nonzero_token(backend, device):
    """A floating mask keeps the tokens where it is != 0 (negative values too) and weights nothing:
    the same bits as the bool mask."""
    gen = make_generator(13)
    x = torch.randn(3, 15, 12, generator=gen).to(device)
    values = torch.tensor([0.0, 0.5, -2.0, 7.0, 1e-30])
    mask = values[torch.randint(0, 5, (3, 15), generator=gen)].to(device)
    mask[1] = 0
    probes = make_probes(4, 12, torch.float32, device, gen)
    out, (dx, dprobes) = check_probe(backend, poison_padding(x, mask), probes, mask)
    out_bool, (dx_bool, dprobes_bool) = check_probe(backend, x, probes, mask != 0)
    assert torch.equal(out, out_bool) and torch.equal(dx, dx_bool) and torch.equal(dprobes, dprobes_bool)


# --- scale, large scores -----------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_default_scale_is_one_over_sqrt_hidden(backend, device):
    """Against softmax written out in float64 (the reference shares the default with the op)."""
    gen = make_generator(14)
    x = torch.randn(2, 9, 40, generator=gen).to(device)
    mask = torch.rand(2, 9, generator=gen).to(device) > 0.3
    mask[:, 0] = True
    probes = make_probes(3, 40, torch.float32, device, gen)
    out = call(backend, x, probes, mask)
    assert torch.equal(out, call(backend, x, probes, mask, scale=40**-0.5))
    scores = (x.double() @ probes.double().T / 40**0.5).masked_fill(~mask[..., None], -INF)
    expected = torch.softmax(scores, 1).transpose(1, 2) @ x.double()
    assert_close(out, expected.float())


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, -2.0, 5.0, 0.0])
def test_scale_argument(scale, backend, device):
    gen = make_generator(stable_seed("probe scale", scale))
    x = torch.randn(3, 19, 24, generator=gen).to(device)
    mask = make_mask("int", 3, 19, gen).to(device)
    probes = make_probes(5, 24, torch.float32, device, gen)
    out, (_, dprobes) = check_probe(backend, poison_padding(x, mask), probes, mask, scale=scale)
    if scale == 0.0:  # uniform weights: every probe gives the mean of the kept tokens
        mean = reference.masked_mean(x.double(), mask).float()
        assert_close(out, mean[:, None].expand_as(out))
        assert not dprobes.any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_scores(dtype, layout, backend, device):
    """x scaled so that scores reach 1e3: exp must see score - max (online softmax stability).
    Rounding grows with the scores: a score's float32 error moves the weights by as much relative
    to 1; ds = p (g.x - g.out) cancels terms as large as x and dprobes multiplies it by x again,
    while near one-hot weights the exact gradients are small. The floors widen to match."""
    gen = make_generator(stable_seed("probe large", layout, str(dtype)))
    x = torch.randn(3, 50, 32, generator=gen)
    probes = torch.randn(4, 32, generator=gen)
    x = x * (1e3 / (x @ probes.T * 32**-0.5).abs().max())
    x, probes = x.to(device, dtype), probes.to(device, dtype)
    largest_score = (x.float() @ probes.float().T * 32**-0.5).abs().max().item()
    widen = ERROR_FLOOR[torch.float32] / ERROR_FLOOR[dtype]  # float32 arithmetic for any input dtype
    widened = 1 + widen * largest_score
    floor_factors = (widened, widened, widened * x.abs().max().item())
    if layout == "padded":
        mask = make_mask("bool", 3, 50, gen).to(device)
        out, _ = check_probe(backend, poison_padding(x, mask), probes, mask, floor_factors=floor_factors)
    else:
        cu_seqlens = cu_seqlens_of([60, 0, 90], device=device)
        out, _ = check_probe(
            backend, x.reshape(150, 32), probes, cu_seqlens=cu_seqlens, floor_factors=floor_factors
        )
    assert out.isfinite().all()


# --- non-finite scores: attention_pool's rules, per probe ------------------------------------------


def _positive_batch(device, gen, hidden=8):
    """x (3, 11, H) > 0 everywhere, seq 1 empty, NaN padding."""
    x = torch.rand(3, 11, hidden, generator=gen).to(device) + 0.5
    mask = (torch.rand(3, 11, generator=gen) > 0.3).to(device)
    mask[:, 0] = True
    mask[1] = False
    return poison_padding(x, mask), mask


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_every_kept_score_minus_inf_is_an_empty_probe(backend, device):
    """scale = inf, x > 0: probe 0 (< 0) has every kept score -inf, so it pools to 0 with zero
    gradients; probe 1 (> 0) has +inf scores, NaN; the empty sequence is 0 whatever the scale."""
    gen = make_generator(15)
    x, mask = _positive_batch(device, gen)
    magnitudes = torch.rand(2, 8, generator=gen).to(device) + 0.5
    probes = magnitudes * torch.tensor([[-1.0], [1.0]], device=device)
    out, (dx, dprobes) = check_probe(backend, x, probes, mask, scale=INF)
    assert not out[:, 0].any() and not dprobes[0].any()
    assert out[[0, 2], 1].isnan().all() and not out[1].any() and dprobes[1].isnan().all()
    out, (dx, dprobes) = check_probe(backend, x, probes[:1], mask, scale=INF)
    assert not out.any() and not dx.any() and not dprobes.any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=str)
def test_nonfinite_probe_makes_that_probe_nan(bad, backend, device):
    """A NaN (or +inf, x > 0) in probe 1 makes its every kept score NaN (+inf): probe 1 is NaN in
    every non-empty sequence, the other probes and their gradients stay finite."""
    gen = make_generator(stable_seed("probe nonfinite", bad))
    x, mask = _positive_batch(device, gen)
    probes = make_probes(3, 8, torch.float32, device, gen)
    probes[1, 3] = bad
    out, (_, dprobes) = check_probe(backend, x, probes, mask)
    assert out[[0, 2], 1].isnan().all() and not out[1].any()
    assert out[:, [0, 2]].isfinite().all() and dprobes[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_overflowing_score_makes_that_probe_nan(backend, device):
    """One float32 score overflows to +inf (probe 0: NaN), one to -inf (probe 1: that token gets no
    weight); probe 2 sees the huge token with a finite score. Against the reference at float32 (in
    float64 nothing overflows)."""
    gen = make_generator(16)
    x = torch.randn(2, 7, 8, generator=gen).to(device)
    x[0, 3, 0] = 3e38
    probes = make_probes(3, 8, torch.float32, device, gen)
    probes[:, 0] = torch.tensor([4.0, -4.0, 2e-38], device=device)  # 2e-38: not subnormal
    out = call(backend, x, probes, scale=0.5)
    expected = reference.probe_attention_pool(x, probes, scale=0.5)
    assert_close(out, expected)
    assert out[0, 0].isnan().all() and out[0, 1:].isfinite().all() and out[1].isfinite().all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_nan_token_makes_its_sequence_nan(backend, device):
    """A kept NaN token makes every probe's score NaN there: its sequence is NaN, no other."""
    gen = make_generator(17)
    x, mask = _positive_batch(device, gen)
    x[2, 0, 5] = NAN
    out, (dx, dprobes) = check_probe(backend, x, make_probes(3, 8, torch.float32, device, gen), mask)
    assert out[2].isnan().all() and out[0].isfinite().all() and dprobes.isnan().all()
    assert dx[0].isfinite().all()


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_reruns_are_bitwise_equal(layout, backend, device):
    """Split sequences (cpu: 2048-row chunks) and dprobes summed over every sequence: the same bits
    on every run."""
    gen = make_generator(stable_seed("probe determinism", layout))
    if layout == "padded":
        x = torch.randn(2, 2100, 16, generator=gen).to(device)
        kwargs = dict(mask=(torch.rand(2, 2100, generator=gen) > 0.1).to(device))
    else:
        x = torch.randn(2600, 16, generator=gen).to(device)
        kwargs = dict(cu_seqlens=cu_seqlens_of([2100, 0, 3, 497], device=device))
    probes = make_probes(4, 16, torch.float32, device, gen)
    grad = random_like_output((2 if layout == "padded" else 4, 4, 16), torch.float32, device)
    fn = lambda a, b: fused_pool.probe_attention_pool(a, b, backend=backend, **kwargs)
    first, first_grads = outputs_and_grads(fn, [x, probes], grad)
    second, second_grads = outputs_and_grads(fn, [x, probes], grad)
    assert torch.equal(first, second)
    for a, b in zip(first_grads, second_grads, strict=True):
        assert torch.equal(a, b)


# --- the identity MAPHead rests on: key projections fold into probes -------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_key_projection_folds_into_a_probe(layout, backend, device):
    """softmax_t(scale q . (W_k x_t + b_k)) pooling of x_t equals probe_attention_pool with the probe
    W_k^T q (q . b_k is the same for every token): outputs, and the gradients of x, W_k and q through
    the fold equal those of the projection written out in float64, where b_k's gradient is 0."""
    gen = make_generator(stable_seed("fold", layout))
    hidden, head_dim, scale = 24, 8, 0.35
    w_k = torch.randn(head_dim, hidden, generator=gen, dtype=torch.float64) * 0.5
    b_k = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    q = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 10, hidden, generator=gen, dtype=torch.float64)
    keep = torch.rand(3, 10, generator=gen) > 0.3
    keep[:, 0] = True
    lengths = keep.sum(1).tolist()

    def projected(x, w_k, b_k, q):
        scores = ((x @ w_k.T + b_k) @ q * scale).masked_fill(~keep, -INF)
        return torch.softmax(scores, 1)[:, None] @ x  # (B, 1, H)

    def folded(x, w_k, q):
        probe = (q @ w_k)[None].float()
        if layout == "padded":
            return call(backend, x.float(), probe, keep.to(device), scale=scale)
        tokens = x[keep.to(device)]  # the kept tokens packed: the same sequences
        return call(
            backend, tokens.float(), probe, cu_seqlens=cu_seqlens_of(lengths, device=device), scale=scale
        )

    grad = torch.randn(3, 1, hidden, generator=gen, dtype=torch.float64)
    expected, (dx, dw_k, db_k, dq) = outputs_and_grads(projected, [x, w_k, b_k, q], grad)
    leaves = [t.to(device).requires_grad_() for t in (x, w_k, q)]
    out = folded(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(device, torch.float32))
    assert_close(out.double().cpu(), expected, dtype=torch.float32)
    assert db_k.abs().max() < 1e-12
    for actual, want in zip(grads, (dx.masked_fill(~keep[..., None], 0), dw_k, dq), strict=True):
        assert_close(actual.cpu(), want, dtype=torch.float32, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_multihead_attention_folds_into_probes(backend, device):
    """nn.MultiheadAttention queried by one latent: per head h, probe_attention_pool of x with the
    probe W_k,h^T q_h and scale 1/sqrt(head_dim), then W_v,h + b_v,h (softmax weights sum to 1) and
    out_proj."""
    torch.manual_seed(18)
    hidden, num_heads, batch, length = 32, 4, 3, 11
    head_dim = hidden // num_heads
    mha = torch.nn.MultiheadAttention(hidden, num_heads, batch_first=True, dtype=torch.float64)
    latent = torch.randn(1, 1, hidden, dtype=torch.float64)
    x = torch.randn(batch, length, hidden, dtype=torch.float64)
    keep = torch.rand(batch, length) > 0.3
    keep[:, 0] = True
    with torch.no_grad():
        expected, _ = mha(latent.expand(batch, 1, hidden), x, x, key_padding_mask=~keep, need_weights=False)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, _, b_v = mha.in_proj_bias.chunk(3)
        q = (w_q @ latent[0, 0] + b_q).view(num_heads, head_dim)
        probes = torch.einsum("hdk,hd->hk", w_k.view(num_heads, head_dim, hidden), q)
        pooled = call(
            backend, x.float().to(device), probes.float().to(device), keep.to(device), scale=head_dim**-0.5
        )
        values = torch.einsum("bhk,hdk->bhd", pooled.double().cpu(), w_v.view(num_heads, head_dim, hidden))
        out = mha.out_proj(values.reshape(batch, hidden) + b_v)
    assert_close(out, expected[:, 0], dtype=torch.float32, atol=2e-5, rtol=2e-5)


# --- argument errors (ValueError / TypeError naming the argument) -------------------------------

x3 = torch.randn(2, 5, 8)
x2 = torch.randn(7, 8)
p2 = torch.randn(2, 8)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
BAD_PROBE_CALLS = [
    # (args, kwargs, error, message fragment): probe_attention_pool(x, probes, mask, **kwargs)
    ((x3, p2.tolist()), {}, TypeError, "probes must be a torch.Tensor"),
    ((x3, p2.int()), {}, TypeError, "probes must be a floating tensor, got dtype torch.int32"),
    ((x3, torch.randn(8)), {}, ValueError, r"probes must be \(P, H\) with H = 8, got shape \(8\)"),
    ((x3, torch.randn(2, 7)), {}, ValueError, r"probes must be \(P, H\) with H = 8, got shape \(2, 7\)"),
    ((x3, torch.randn(1, 2, 8)), {}, ValueError, r"probes must be \(P, H\)"),
    ((x3, torch.randn(0, 8)), {}, ValueError, r"probes must hold 1 to 256 probes \(P, H\), got P = 0"),
    ((x3, torch.randn(257, 8)), {}, ValueError, "probes must hold 1 to 256 probes .*got P = 257"),
    ((x3, p2.to("meta")), {}, ValueError, "probes is on meta but x is on cpu"),
    ((x3, p2), {"scale": "0.5"}, TypeError, "scale must be a Python float or None, got str"),
    ((x3, p2), {"scale": torch.tensor(0.5)}, TypeError, "scale must be a Python float or None, got Tensor"),
    ((x3, p2), {"scale": True}, TypeError, "scale must be a Python float or None, got bool"),
    ((x3, p2, torch.ones(2, 4)), {}, ValueError, r"mask must be \(B, L\) = \(2, 5\) .* got shape \(2, 4\)"),
    (
        (x3, p2, torch.ones(2, 5, dtype=torch.complex64)),
        {},
        TypeError,
        "mask must be bool, integer or floating",
    ),
    ((x3, p2, torch.ones(2, 5, device="meta")), {}, ValueError, "mask is on meta but x is on cpu"),
    ((x2, p2, torch.ones(7)), {"cu_seqlens": cu}, ValueError, "mask must be None when cu_seqlens is given"),
    ((x2, p2), {}, ValueError, r"x must be \(B, L, H\) when cu_seqlens is None"),
    ((x3.int(), p2), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
    ((x2, p2), {"cu_seqlens": cu.float()}, TypeError, "cu_seqlens must be int32 or int64"),
    ((x3, p2), {"cu_seqlens": cu}, ValueError, r"x must be \(T, H\) or \(1, T, H\) when cu_seqlens is given"),
    ((x2, p2), {"cu_seqlens": cu, "max_seqlen": -1}, ValueError, "max_seqlen must be >= 0"),
]
ARGUMENT_BACKENDS = [None, *(p.values[0] for p in BACKENDS if p.values[1] == "cpu")]


@pytest.mark.parametrize("backend", ARGUMENT_BACKENDS)
@pytest.mark.parametrize("args, kwargs, error, message", BAD_PROBE_CALLS)
def test_bad_probe_attention_input(backend, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_pool.probe_attention_pool(*args, backend=backend, **kwargs)
