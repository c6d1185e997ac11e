"""The extension's probe_attention kernels (backend "cpu", and "cuda" on a GPU) against the reference:
outputs and the gradients of x and probes for P = 1 .. 256, padded (every mask kind, NaN padding) and
varlen (int32 / int64, strided cu_seqlens views, empty and one-token sequences), H = 1 and H not a
power of two, non-contiguous inputs, split sequences, large scores, non-finite scores and scales,
malformed cu_seqlens, determinism, and the ops' argument checks (torch.ops.fused_pool.ext_probe_*)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    EXTENSION_DEVICES,
    assert_close,
    check_attention,
    cu_seqlens_of,
    make_generator,
    make_mask,
    needs_extension,
    outputs_and_grads,
    poison_padding,
    stable_seed,
)

import fused_pool
from fused_pool import reference

pytestmark = needs_extension
ops = torch.ops.fused_pool
BACKEND = {"cpu": "cpu", "cuda": "cuda"}
OP = "probe_attention_pool"


def _inputs(shape, num_probes, dtype, device, gen, scale=1.0):
    x = (torch.randn(shape, generator=gen) * scale).to(device, dtype)
    probes = torch.randn(num_probes, shape[-1], generator=gen).to(device, dtype)
    return x, probes


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "left_padded"])
@pytest.mark.parametrize("num_probes", [1, 3, 16, 64, 256])
def test_padded_matches_reference(num_probes, mask_kind, device):
    gen = make_generator(stable_seed("probe", num_probes, mask_kind))
    batch, length, hidden = 4, 37, 40
    x, probes = _inputs((batch, length, hidden), num_probes, torch.float32, device, gen)
    mask = make_mask(mask_kind, batch, length, gen)
    mask = mask if mask is None else mask.to(device)
    check_attention(OP, BACKEND[device], poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 13, 1), (2, 50, 1000), (2, 600, 24)], ids=str)
def test_dtypes_and_shapes(shape, dtype, device):
    """H = 1, H not a power of two, one token, and (2, 600, 24): sequences split into chunks."""
    gen = make_generator(stable_seed("probe-shape", shape))
    x, probes = _inputs(shape, 5, dtype, device, gen)
    mask = make_mask("bool", shape[0], shape[1], gen)
    if shape[0] == 1:
        mask = None
    mask = mask if mask is None else mask.to(device)
    check_attention(OP, BACKEND[device], poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("lengths", [[5, 0, 1, 30], [0, 3], [300, 2, 450], [1]], ids=str)
def test_varlen_matches_reference(lengths, index_dtype, device):
    gen = make_generator(stable_seed("probe-varlen", lengths))
    x, probes = _inputs((sum(lengths), 24), 6, torch.float32, device, gen)
    cu_seqlens = cu_seqlens_of(lengths, index_dtype, device)
    out, _ = check_attention(OP, BACKEND[device], x, probes, cu_seqlens=cu_seqlens)
    for b, length in enumerate(lengths):  # an empty sequence pools to 0
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_no_rows(layout, device):
    """T = 0 (or L = 0): every probe empty, 0, stats (-inf, 0), zero gradients."""
    x = torch.randn(0, 8, device=device) if layout == "varlen" else torch.randn(2, 0, 8, device=device)
    cu_seqlens = cu_seqlens_of([0, 0], device=device) if layout == "varlen" else None
    probes = torch.randn(3, 8, device=device)
    out, stats = ops.ext_probe_attention_fwd(x, probes, None, cu_seqlens, None, 0.5)
    assert torch.equal(out, torch.zeros(2, 3, 8, device=device))
    assert torch.equal(stats[..., 1], torch.zeros(2, 3, device=device))
    grad = torch.ones_like(out)
    dx, dprobes = ops.ext_probe_attention_bwd(grad, x, probes, None, cu_seqlens, out, stats, 0.5)
    assert dx.shape == x.shape and torch.equal(dprobes, torch.zeros_like(probes))


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_strided_cu_seqlens_view(device):
    gen = make_generator(3)
    x, probes = _inputs((40, 16), 4, torch.float32, device, gen)
    spread = torch.tensor([0, -7, 9, -7, 9, -7, 25, -7, 40], device=device)[::2]  # (0, 9, 9, 25, 40)
    check_attention(OP, BACKEND[device], x, probes, cu_seqlens=spread)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_non_contiguous_inputs(device):
    gen = make_generator(4)
    base = torch.randn(3, 24, 2 * 20, generator=gen).to(device)
    x = base[..., ::2]  # channel stride 2
    probes = torch.randn(20, 7, generator=gen).to(device).t()  # (7, 20), strides (1, 7)
    mask = make_mask("bool", 3, 24, gen).to(device)
    check_attention(OP, BACKEND[device], x, probes, mask)
    x_t = torch.randn(24, 3, 20, generator=gen).to(device).transpose(0, 1)  # row stride 3 * H
    check_attention(OP, BACKEND[device], x_t, probes, mask)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_scale_and_large_scores(device):
    gen = make_generator(5)
    x, probes = _inputs((3, 40, 32), 8, torch.float32, device, gen, scale=30.0)
    check_attention(OP, BACKEND[device], x, probes, scale=0.7)  # scores of order 1e3: saturated softmax


def _nonfinite_case(device, scale):
    """x > 0; probe 0 all -1 (every score -inf at scale inf), probe 1 all +1 (+inf), probe 2 random."""
    gen = make_generator(6)
    x = torch.rand(3, 9, 8, generator=gen).to(device) + 0.1
    probes = torch.randn(3, 8, generator=gen).to(device)
    probes[0], probes[1] = -1.0, 1.0
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[1] = False  # an empty sequence
    mask[2, 5:] = False
    return poison_padding(x, mask), probes, mask


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("scale", [math.inf, math.nan, -math.inf], ids=str)
def test_nonfinite_scale_follows_reference(scale, device):
    x, probes, mask = _nonfinite_case(device, scale)
    grad = torch.randn(3, 3, 8, generator=make_generator(7)).to(device)
    ref = lambda a, b: reference.probe_attention_pool(a, b, mask, scale=scale)
    fused = lambda a, b: fused_pool.probe_attention_pool(a, b, mask, scale=scale, backend=BACKEND[device])
    ref_out, ref_grads = outputs_and_grads(ref, [x, probes], grad)
    out, grads = outputs_and_grads(fused, [x, probes], grad, poisoned=True)
    assert_close(out, ref_out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the empty sequence: 0, whatever the scale
    for actual, expected in zip(grads, ref_grads, strict=True):
        assert torch.equal(actual.isnan(), expected.isnan())
        assert_close(actual, expected)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("row", [3, 500])  # the first and a later chunk of a split sequence
def test_nonfinite_token_follows_reference(bad, row, device):
    """A NaN token makes every probe of its sequence NaN; an infinite one the probes it scores +inf
    (the others get NaN in its channel only, 0 * inf), as the reference does."""
    gen = make_generator(8)
    x, probes = _inputs((2, 600, 16), 3, torch.float32, device, gen)
    x[0, row, 4] = bad
    grad = torch.randn(2, 3, 16, generator=gen).to(device)
    ref = lambda a, b: reference.probe_attention_pool(a, b, scale=0.25)
    fused = lambda a, b: fused_pool.probe_attention_pool(a, b, scale=0.25, backend=BACKEND[device])
    ref_out, ref_grads = outputs_and_grads(ref, [x, probes], grad)
    out, grads = outputs_and_grads(fused, [x, probes], grad, poisoned=True)
    assert_close(out, ref_out)
    assert not out[1].isnan().any()
    if bad != bad:
        assert out[0].isnan().all()
    for actual, expected in zip(grads, ref_grads, strict=True):
        assert torch.equal(actual.isnan(), expected.isnan())


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_padding_is_never_read_even_when_split(device):
    gen = make_generator(9)
    x, probes = _inputs((2, 700, 12), 4, torch.float64, device, gen)
    mask = torch.rand(2, 700, generator=gen) > 0.5
    mask[1, :650] = False
    mask = mask.to(device)
    check_attention(OP, BACKEND[device], poison_padding(x, mask), probes, mask)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_malformed_cu_seqlens_are_clamped(device):
    gen = make_generator(10)
    x, probes = _inputs((30, 8), 3, torch.float64, device, gen)
    cu_seqlens = torch.tensor([0, 12, 5, 40, -3, 30], device=device)
    out, stats = ops.ext_probe_attention_fwd(x, probes, None, cu_seqlens, None, 0.5)
    bounds = [(0, 12), (12, 12), (5, 30), (30, 30), (0, 30)]  # each segment clamped to [0, T]
    for b, (start, end) in enumerate(bounds):
        one = cu_seqlens_of([end - start])
        expected = reference.probe_attention_pool(x[start:end], probes, scale=0.5, cu_seqlens=one)
        assert_close(out[b], expected[0])
    grad = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64).to(device)
    dx, dprobes = ops.ext_probe_attention_bwd(grad, x, probes, None, cu_seqlens, out, stats, 0.5)
    assert dx.shape == x.shape and dprobes.shape == probes.shape and dx.isfinite().all()


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype, device):
    gen = make_generator(11)
    x, probes = _inputs((3, 900, 48), 16, dtype, device, gen)
    mask = make_mask("bool", 3, 900, gen).to(device)
    grad = torch.randn(3, 16, 48, generator=gen).to(device)

    def run():
        out, stats = ops.ext_probe_attention_fwd(x, probes, mask, None, None, 0.2)
        return (out, stats, *ops.ext_probe_attention_bwd(grad, x, probes, mask, None, out, stats, 0.2))

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_outputs_and_stats(device):
    gen = make_generator(12)
    x, probes = _inputs((2, 10, 6), 3, torch.bfloat16, device, gen)
    mask = torch.ones(2, 10, dtype=torch.bool, device=device)
    mask[1] = False
    out, stats = ops.ext_probe_attention_fwd(x, probes, mask, None, None, 0.5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 6) and stats.shape == (2, 3, 2)
    scores = 0.5 * x[0].float() @ probes.float().T  # (L, P)
    assert_close(stats[0, :, 0], scores.max(0).values, dtype=torch.float32)
    assert_close(stats[0, :, 1], (scores - scores.max(0).values).exp().sum(0), dtype=torch.float32)
    assert torch.equal(stats[1, :, 1], torch.zeros(3, device=device))
    assert torch.equal(stats[1, :, 0], torch.full((3,), -math.inf, device=device))


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_argument_checks(device):
    x = torch.randn(2, 5, 8, device=device)
    probes = torch.randn(3, 8, device=device)
    fwd = ops.ext_probe_attention_fwd
    with pytest.raises(RuntimeError, match="probes must be \\(P, H\\)"):
        fwd(x, probes[:, :4], None, None, None, 1.0)
    with pytest.raises(RuntimeError, match="1 to 256 probes"):
        fwd(x, torch.randn(257, 8, device=device), None, None, None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be None"):
        fwd(x[0], probes, torch.ones(5, device=device), cu_seqlens_of([5], device=device), None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be"):
        fwd(x, probes, torch.ones(2, 4, device=device), None, None, 1.0)
    out, stats = fwd(x, probes, None, None, None, 1.0)
    grad = torch.randn(2, 3, 8, device=device)
    bwd = ops.ext_probe_attention_bwd
    with pytest.raises(RuntimeError, match="out must be"):
        bwd(grad, x, probes, None, None, out.double(), stats, 1.0)
    with pytest.raises(RuntimeError, match="stats must be"):
        bwd(grad, x, probes, None, None, out, stats[:, :2], 1.0)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        bwd(grad[:, :2], x, probes, None, None, out, stats, 1.0)
