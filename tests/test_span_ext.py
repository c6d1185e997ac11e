"""The extension's span ops called directly (torch.ops.fused_pool.ext_span_fwd / ext_span_bwd), against a
float64 per-span reference written here: overlapping, nested, repeated, empty and malformed spans, masks
of every kind, strided inputs, NaN outside every span, long spans that the CPU forward splits."""

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import EXTENSION_DEVICES, needs_extension

from fused_pool.contract import MAX, MEAN, MEAN_MAX

ops = torch.ops.fused_pool
MODES = {"mean": MEAN, "max": MAX, "mean_max": MEAN_MAX}
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}


def clamped(spans: torch.Tensor, num_tokens: int) -> list[tuple[int, int]]:
    bounds = []
    for start, end in spans.tolist():
        start = min(max(start, 0), num_tokens)
        bounds.append((start, min(max(end, start), num_tokens)))
    return bounds


def weights_of(mask, num_tokens: int) -> torch.Tensor:
    if mask is None:
        return torch.ones(num_tokens, dtype=torch.float64)
    if mask.is_floating_point():
        return mask.double()
    return (mask != 0).double()


def reference_forward(x, spans, mask, mode):
    """(out in x's dtype, den float64, argmax int32) in float64 arithmetic, one span at a time."""
    num_tokens, hidden = x.shape
    w = weights_of(mask, num_tokens)
    means, maxima, dens, argmaxes = [], [], [], []
    for start, end in clamped(spans, num_tokens):
        rows = [t for t in range(start, end) if w[t] != 0]
        values = x[rows].double() if rows else torch.zeros(0, hidden, dtype=torch.float64)
        weights = w[rows]
        den = weights.sum()
        dens.append(den)
        means.append((weights[:, None] * values).sum(0) / den if den != 0 else torch.zeros(hidden).double())
        index = torch.full((hidden,), -1, dtype=torch.int64)
        best = torch.zeros(hidden, dtype=torch.float64)
        for i, t in enumerate(rows):  # the first NaN wins, else the first maximal token
            v = values[i]
            take = (index < 0) | (v.isnan() & ~best.isnan()) | (~best.isnan() & (v > best))
            best = torch.where(take, v, best)
            index = torch.where(take, torch.full_like(index, t - start), index)
        maxima.append(best)
        argmaxes.append(index.int())
    halves = ([torch.stack(means)] if mode & MEAN else []) + ([torch.stack(maxima)] if mode & MAX else [])
    return torch.cat(halves, 1).to(x.dtype), torch.stack(dens), torch.stack(argmaxes)


def reference_backward(grad, spans, mask, den, argmax, num_tokens, hidden, mode):
    w = weights_of(mask, num_tokens)
    grad = grad.double()
    dx = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for s, (start, end) in enumerate(clamped(spans, num_tokens)):
        if mode & MEAN and den[s] != 0:
            for t in range(start, end):
                dx[t] += w[t] * grad[s, :hidden] / den[s].double()
        if mode & MAX:
            for h in range(hidden):
                if argmax[s, h] >= 0:
                    dx[start + int(argmax[s, h]), h] += grad[s, -hidden:][h]
    return dx


def make_case(num_tokens, hidden, spans, dtype, mask_kind, gen, nan_outside=True):
    x = torch.randn(num_tokens, 2 * hidden, generator=gen).to(dtype)[:, ::2]  # strided channels
    covered = torch.zeros(num_tokens, dtype=torch.bool)
    for start, end in clamped(spans, num_tokens):
        covered[start:end] = True
    if nan_outside:
        x[~covered] = float("nan")  # never read
    mask = {
        "none": None,
        "bool": torch.rand(num_tokens, generator=gen) > 0.3,
        "int": (torch.rand(num_tokens, generator=gen) > 0.3).to(torch.int32),
        "float": torch.rand(num_tokens, generator=gen) * (torch.rand(num_tokens, generator=gen) > 0.3),
        "half": (torch.rand(num_tokens, generator=gen) + 0.5).half(),
    }[mask_kind]
    return x, mask


SPANS = torch.tensor([[2, 9], [0, 4], [3, 7], [3, 7], [5, 5], [8, 3], [-4, 2], [10, 99], [40, 45], [0, 20]])


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "float", "half"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_span_ops_match_reference(device, dtype, mode, mask_kind, index_dtype):
    gen = torch.Generator().manual_seed(hash((str(dtype), mode, mask_kind)) % 1000)
    num_tokens, hidden = 24, 40
    spans = SPANS.to(index_dtype)
    x, mask = make_case(num_tokens, hidden, spans, dtype, mask_kind, gen)
    m = MODES[mode]
    ref_out, ref_den, ref_argmax = reference_forward(x, spans, mask, m)
    dev_mask = None if mask is None else mask.to(device)
    spans_view = spans.t().contiguous().t().to(device)  # any strides
    out, den, argmax = ops.ext_span_fwd(x.to(device), spans_view, dev_mask, m)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == ref_out.shape
    torch.testing.assert_close(out.cpu(), ref_out, **TOL[dtype], equal_nan=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if m & MEAN:
        assert den.dtype == acc
        torch.testing.assert_close(den.cpu().double(), ref_den, rtol=1e-6, atol=1e-6)
    else:
        assert den.shape == (0,)
    if m & MAX:
        assert torch.equal(argmax.cpu(), ref_argmax)
    else:
        assert argmax.shape == (0,)

    grad = torch.randn(out.shape, generator=gen).to(dtype)
    dx = ops.ext_span_bwd(grad.to(device), spans_view, dev_mask, den, argmax, [num_tokens, hidden], dtype, m)
    expected = reference_backward(grad, spans, mask, ref_den, ref_argmax, num_tokens, hidden, m)
    assert dx.dtype == dtype and dx.is_contiguous() and dx.shape == (num_tokens, hidden)
    torch.testing.assert_close(dx.cpu(), expected.to(dtype), **TOL[dtype])
    again = ops.ext_span_bwd(
        grad.to(device), spans_view, dev_mask, den, argmax, [num_tokens, hidden], dtype, m
    )
    assert torch.equal(dx, again)  # deterministic


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_long_spans_split_ties_and_nan(device, mode):
    """Spans far longer than the average are split on CPU: sums and ties (the first maximal token
    wins) must come out as for one pass, and a kept NaN wins the max."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, hidden = 9000, 12
    x = torch.randint(0, 4, (num_tokens, hidden), generator=gen).float()
    x[6000, 3] = float("nan")
    spans = torch.tensor([[0, 9000], [100, 8100], [4000, 4003], [8999, 9000], [50, 7000]])
    m = MODES[mode]
    mask = torch.rand(num_tokens, generator=gen) > 0.1
    ref_out, ref_den, ref_argmax = reference_forward(x, spans, mask, m)
    out, den, argmax = ops.ext_span_fwd(x.to(device), spans.to(device), mask.to(device), m)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
    if m & MAX:
        assert torch.equal(argmax.cpu(), ref_argmax)
    grad = torch.randn(out.shape, generator=gen)
    dx = ops.ext_span_bwd(
        grad.to(device), spans.to(device), mask.to(device), den, argmax, [num_tokens, hidden], x.dtype, m
    )
    expected = reference_backward(grad, spans, mask, ref_den, ref_argmax, num_tokens, hidden, m)
    torch.testing.assert_close(dx.cpu(), expected.float(), rtol=1e-5, atol=1e-6)


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
def test_empty_shapes(device):
    x = torch.randn(5, 3, device=device)
    no_spans = torch.zeros(0, 2, dtype=torch.int64, device=device)
    out, den, argmax = ops.ext_span_fwd(x, no_spans, None, MEAN_MAX)
    assert out.shape == (0, 6) and den.shape == (0,) and argmax.shape == (0, 3)
    dx = ops.ext_span_bwd(out, no_spans, None, den, argmax, [5, 3], x.dtype, MEAN_MAX)
    assert torch.equal(dx.cpu(), torch.zeros(5, 3))
    spans = torch.tensor([[0, 5], [2, 9]], device=device)
    out, den, argmax = ops.ext_span_fwd(torch.randn(0, 3, device=device), spans, None, MEAN_MAX)
    assert torch.equal(out.cpu(), torch.zeros(2, 6)) and torch.equal(argmax.cpu(), torch.full((2, 3), -1))


@needs_extension
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, s: ops.ext_span_fwd(x, s[:, :1], None, MEAN), "spans must be \\(S, 2\\)"),
        (lambda x, s: ops.ext_span_fwd(x, s.float(), None, MEAN), "spans must be int32 or int64"),
        (lambda x, s: ops.ext_span_fwd(x[None], s, None, MEAN), "x must be \\(T, H\\)"),
        (lambda x, s: ops.ext_span_fwd(x.int(), s, None, MEAN), "x must be float16"),
        (lambda x, s: ops.ext_span_fwd(x, s, torch.ones(3), MEAN), "mask must be \\(T,\\)"),
        (lambda x, s: ops.ext_span_fwd(x, s, None, 5), "mode must be 1"),
        (
            lambda x, s: ops.ext_span_bwd(
                torch.ones(2, 4), s, None, torch.ones(2), torch.ones(0), [8, 4], torch.float32, MEAN_MAX
            ),
            "grad_out must be \\(S, 2H\\)",
        ),
        (
            lambda x, s: ops.ext_span_bwd(
                torch.ones(2, 4), s, None, torch.ones(2).double(), torch.ones(0), [8, 4], torch.float32, MEAN
            ),
            "den must be Float",
        ),
        (
            lambda x, s: ops.ext_span_bwd(
                torch.ones(2, 4), s, None, torch.ones(0), torch.ones(2, 4).int(), [8, 3], torch.float32, MAX
            ),
            "grad_out must be \\(S, H\\)",
        ),
    ],
)
def test_argument_checks_name_the_argument(call, message):
    x = torch.randn(8, 4)
    spans = torch.tensor([[0, 3], [2, 8]])
    with pytest.raises(RuntimeError, match=message):
        call(x, spans)


def test_span_kernels_use_128_bit_accesses_cpu(tmp_path):
    """span_cuda.cu compiled for sm_90: the vectorized (VEC > 1) kernels read x / grad / argmax with
    LDG.E.128, the backward writes dx with nothing but STG.E.128 and the forward writes out with it."""
    import triton  # bundles a cuobjdump under backends/nvidia/bin

    nvcc = shutil.which("nvcc")
    bundled = glob.glob(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    )
    cuobjdump = bundled[0] if bundled else shutil.which("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    cubin = tmp_path / "span_cuda.cubin"
    source = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "span_cuda.cu"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-o", cubin, source], check=True)
    dump = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if dump.returncode != 0:  # e.g. a cuobjdump older than nvcc
        pytest.skip(f"cuobjdump cannot read nvcc's output: {dump.stderr.strip()[:200]}")
    functions = re.split(r"\n\s*Function : ", dump.stdout)[1:]
    for kind in ("span_backward_kernel", "span_forward_kernel"):
        # Vectorized instantiations: <half, 8>, <bf16, 8>, <float, 4>, <double, 2>, three modes each.
        vectorized = [
            f for f in functions if re.match(rf"\S*{kind}I(6__halfLi8|13__nv_bfloat16Li8|fLi4|dLi2)E", f)
        ]
        assert len(vectorized) == 12, f"expected 12 vectorized {kind} instantiations"
        for function in vectorized:
            name = function.split()[0]
            stores = set(re.findall(r"\bSTG\.E(?:\.(\w+))?", function))
            assert "128" in re.findall(r"\bLDG\.E(?:\.(\w+))?", function), f"{name}: no LDG.E.128"
            if kind == "span_backward_kernel":
                assert stores == {"128"}, f"{name}: stores {sorted(stores)}"
            else:  # out and argmax 16 bytes; den a scalar
                assert "128" in stores, f"{name}: no STG.E.128"
