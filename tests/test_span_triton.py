"""The Triton span kernels (triton_kernels/span.py): called directly against a plain float64 span
reference written here (den and argmax too), and through span_pool against fused_pool.reference.
To be folded into test_span.py."""

import pytest
import torch
from helpers import assert_close, make_generator, stable_seed

import fused_pool
from fused_pool import reference as fused_reference
from fused_pool.contract import MAX, MEAN, MEAN_MAX
from fused_pool.triton_kernels import span as triton_span
from fused_pool.triton_kernels.span import span_bwd, span_fwd

MODES = {"mean": MEAN, "max": MAX, "mean_max": MEAN_MAX}


def _clamp(spans, num_rows):
    for start, end in spans.tolist():
        start = min(max(start, 0), num_rows)
        yield start, min(max(end, start), num_rows)


def reference(x, spans, mask, mode, grad):
    """(out, den, argmax, dx) in float64 from the contract, one span at a time."""
    num_rows, hidden = x.shape
    x64 = x.double()
    if mask is None:
        w = torch.ones(num_rows, dtype=torch.float64)
    else:  # bool / integer: keep where nonzero; floating: weights
        w = mask.double() if mask.is_floating_point() else (mask != 0).double()
    outs, dens, argmaxes = [], [], []
    dx = torch.zeros(num_rows, hidden, dtype=torch.float64)
    g = grad.double()
    for s, (start, end) in enumerate(_clamp(spans, num_rows)):
        kept = [t for t in range(start, end) if w[t] != 0]
        parts = []
        if mode & MEAN:
            den = sum(float(w[t]) for t in kept)
            total = sum((w[t] * x64[t] for t in kept), torch.zeros(hidden, dtype=torch.float64))
            parts.append(total / den if den else total)
            dens.append(den)
            for t in kept:
                if den:
                    dx[t] += w[t] * g[s, :hidden] / den
        if mode & MAX:
            best = torch.zeros(hidden, dtype=torch.float64)
            row = torch.full((hidden,), -1, dtype=torch.int32)
            for h in range(hidden):
                values = [float(x64[t, h]) for t in kept]
                nans = [i for i, v in enumerate(values) if v != v]
                if values:
                    i = nans[0] if nans else max(range(len(values)), key=lambda i: (values[i], -i))
                    best[h], row[h] = values[i], kept[i] - start
                    dx[kept[i], h] += g[s, -hidden + h]
            parts.append(best)
            argmaxes.append(row)
        outs.append(torch.cat(parts) if parts else torch.zeros(0))
    width = 2 * hidden if mode == MEAN_MAX else hidden
    out = torch.stack(outs) if outs else torch.zeros(0, width, dtype=torch.float64)
    argmax = torch.stack(argmaxes) if argmaxes else torch.zeros(0, hidden, dtype=torch.int32)
    return out, torch.tensor(dens, dtype=torch.float64), argmax, dx


def make_spans(num_rows, num_spans, gen, dtype=torch.int64):
    """Overlapping, nested, repeated, empty and malformed spans."""
    starts = torch.randint(-3, num_rows + 3, (num_spans,), generator=gen)
    lengths = torch.randint(-2, num_rows + 2, (num_spans,), generator=gen)
    spans = torch.stack([starts, starts + lengths], 1)
    if num_spans >= 4:
        spans[1] = spans[0]  # repeated
        spans[2] = torch.tensor([5, 2])  # start > end: empty
        spans[3] = torch.tensor([0, num_rows])  # the whole sequence
    return spans.to(dtype)


def make_mask(kind, num_rows, gen):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(num_rows, generator=gen) > 0.3
    if kind == "int":
        return (torch.rand(num_rows, generator=gen) > 0.3).to(torch.int32) * 3
    weights = torch.rand(num_rows, generator=gen) + 0.1
    return torch.where(torch.rand(num_rows, generator=gen) > 0.3, weights, 0.0)


def check(x, spans, mask, mode, seed):
    gen = make_generator(seed)
    width = 2 * x.shape[1] if mode == MEAN_MAX else x.shape[1]
    grad = torch.randn(spans.shape[0], width, generator=gen).to(x.dtype)
    out, den, argmax = span_fwd(x, spans, mask, mode)
    dx = span_bwd(grad, spans, mask, den, argmax, x.shape, x.dtype, mode)
    ref_out, ref_den, ref_argmax, ref_dx = reference(x, spans, mask, mode, grad)
    assert out.dtype == x.dtype and dx.dtype == x.dtype and dx.is_contiguous()
    assert_close(out, ref_out.to(x.dtype), dtype=x.dtype)
    assert_close(dx, ref_dx.to(x.dtype), dtype=x.dtype)
    if mode & MEAN:
        assert_close(den, ref_den.to(den.dtype), dtype=x.dtype)
    else:
        assert den.shape == (0,)
    if mode & MAX:
        assert torch.equal(argmax, ref_argmax)
    else:
        assert argmax.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_span_kernels_match_reference(mode, mask_kind, dtype):
    gen = make_generator(stable_seed("span", mode, mask_kind, str(dtype)))
    num_rows, hidden = 37, 20
    x = torch.randn(num_rows, hidden, generator=gen).to(dtype)
    x[torch.rand(num_rows, hidden, generator=gen) < 0.3] = 0.5  # ties: the first maximal token wins
    spans = make_spans(num_rows, 9, gen)
    check(x, spans, make_mask(mask_kind, num_rows, gen), MODES[mode], seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_tokens_in_no_span_are_never_read_and_nan_wins(mode):
    gen = make_generator(3)
    x = torch.randn(50, 5, generator=gen)
    spans = torch.tensor([[2, 9], [20, 31], [25, 27], [20, 31], [40, 40]])
    covered = torch.zeros(50, dtype=torch.bool)
    for start, end in spans.tolist():
        covered[start:end] = True
    x[~covered] = float("nan")
    x[4, 1] = x[7, 1] = float("nan")  # a kept NaN wins, the first one
    check(x, spans, None, MODES[mode], seed=4)


@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs_and_int32_spans(mode):
    gen = make_generator(5)
    x = torch.randn(40, 24, generator=gen)[::2, ::2]
    spans = make_spans(20, 6, gen, dtype=torch.int32).t().contiguous().t()  # column-major (S, 2)
    mask = torch.rand(40, generator=gen)[::2]
    check(x, spans, mask, MODES[mode], seed=6)


@pytest.mark.parametrize("mode", MODES)
def test_long_spans_split_over_programs(mode, monkeypatch):
    """Few long spans: the forward splits them into chunks combined in order (same results)."""
    monkeypatch.setattr(triton_span, "resident_programs", lambda device: 64)
    assert triton_span.plan_span_split(2, 600, 1, 16, torch.device("cpu")).splits > 1
    gen = make_generator(7)
    x = torch.randn(600, 3, generator=gen)
    x[300:310] = 9.0  # ties across chunks: the first one wins
    spans = torch.tensor([[0, 600], [150, 599], [590, 600], [700, 800]])
    check(x, spans, make_mask("float", 600, gen), MODES[mode], seed=8)


@pytest.mark.parametrize("mode", MODES)
def test_backward_walks_many_span_blocks(mode, monkeypatch):
    """Tiles of 4 tokens under spans in no order, more than one block of SPANS_PER_TEST: each tile
    walks the spans between the first and the last that touch it, skipping blocks that miss it."""
    monkeypatch.setattr(triton_span, "SPANS_PER_TEST", 4)
    monkeypatch.setattr(triton_span, "_rows_per_tile", lambda block_h: 4)
    gen = make_generator(9)
    x = torch.randn(70, 4, generator=gen)
    check(x, make_spans(70, 19, gen), make_mask("bool", 70, gen), MODES[mode], seed=10)


@pytest.mark.parametrize("mode", MODES)
def test_empty_inputs(mode):
    width = 8 if mode == "mean_max" else 4
    out, den, argmax = span_fwd(torch.randn(0, 4), torch.tensor([[0, 3], [-1, 2]]), None, MODES[mode])
    assert out.shape == (2, width) and not out.any()
    dx = span_bwd(torch.randn(2, width), torch.tensor([[0, 3]]), None, den, argmax, (0, 4), torch.float32, 1)
    assert dx.shape == (0, 4)
    out, _, _ = span_fwd(torch.randn(5, 4), torch.zeros(0, 2, dtype=torch.int64), None, MODES[mode])
    assert out.shape == (0, width)
    dx = span_bwd(torch.randn(0, width), torch.zeros(0, 2), None, den, argmax, (5, 4), torch.float32, 1)
    assert dx.shape == (5, 4) and not dx.any()
    # H = 0: the saved state is still defined (den 0, argmax -1), as for the pool op.
    _, den, argmax = span_fwd(torch.randn(5, 0), torch.tensor([[0, 3]]), None, MEAN_MAX)
    assert den.tolist() == [0.0] and argmax.shape == (1, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_span_pool_triton_matches_reference(mode, mask_kind):
    """(B, L, H) input through the public function, values and gradients against fused_pool.reference."""
    gen = make_generator(stable_seed("span_pool", mode, mask_kind))
    x = torch.randn(3, 11, 6, generator=gen)
    spans = make_spans(33, 8, gen, dtype=torch.int32)
    mask = make_mask(mask_kind, 33, gen)
    mask = None if mask is None else mask.view(3, 11)
    results = []
    for pool in (
        lambda x: fused_pool.span_pool(x, spans, mask, mode=mode, backend="triton"),
        lambda x: fused_reference.span_pool(x, spans, mask, mode=mode),
    ):
        leaf = x.clone().requires_grad_(True)
        out = pool(leaf)
        grad = torch.randn(out.shape, generator=make_generator(11))
        results.append((out.detach(), torch.autograd.grad(out, leaf, grad)[0]))
    (out, dx), (ref_out, ref_dx) = results
    assert_close(out, ref_out, dtype=x.dtype)
    assert_close(dx, ref_dx, dtype=x.dtype)
