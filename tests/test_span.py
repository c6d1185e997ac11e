"""span_pool (op kind "span"): every backend against fused_pool.reference (outputs and gradients, with
NaN in every token outside the spans), the reference's own hand-computed semantics, malformed spans,
strides, edge sizes, determinism where spans overlap, a stale extension."""

from __future__ import annotations

import pytest
import torch
from helpers import SPAN_BACKENDS, assert_close, make_generator, outputs_and_grads, stable_seed

import fused_pool
from fused_pool import ops, reference

MODES = ["mean", "max", "mean_max"]
SPAN_MASKS = ["none", "bool", "int", "float"]


def make_spans(num_tokens: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    """Overlapping, nested, repeated and empty spans that leave gaps (tokens in no span), plus random
    ones inside [0, 3T/4)."""
    third = max(num_tokens // 3, 1)
    fixed = [
        (0, third),  # a span
        (third // 2, 2 * third),  # overlapping it
        (1, 2),  # nested in both
        (0, third),  # repeated
        (third, third),  # empty
        (2 * third + 2, num_tokens - 1),  # after a gap of two tokens, before the last one
    ]
    starts = torch.randint(0, max(3 * num_tokens // 4, 1), (5,), generator=gen)
    lengths = torch.randint(0, 6, (5,), generator=gen)
    spans = fixed + list(zip(starts.tolist(), (starts + lengths).clamp(max=num_tokens).tolist(), strict=True))
    return torch.tensor(spans, dtype=dtype)


def covered(spans: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(T,) bool: the token lies in some clamped span."""
    inside = torch.zeros(num_tokens, dtype=torch.bool)
    for start, end in spans.tolist():
        start = min(max(start, 0), num_tokens)
        inside[start : min(max(end, start), num_tokens)] = True
    return inside


def make_span_mask(kind: str, token_shape, gen: torch.Generator):
    if kind == "none":
        return None
    keep = torch.rand(token_shape, generator=gen) > 0.3
    if kind == "bool":
        return keep
    if kind == "int":
        return keep.int()
    return torch.where(keep, torch.rand(token_shape, generator=gen) * 1.75 + 0.25, 0.0)


def make_inputs(token_shape, hidden, dtype, mask_kind, seed, spans_dtype=torch.int64):
    """x (token_shape + (H,)) with NaN in every token outside the spans, the spans, the mask."""
    gen = make_generator(seed)
    num_tokens = int(torch.Size(token_shape).numel())
    x = torch.randn(*token_shape, hidden, generator=gen, dtype=torch.float64)
    spans = make_spans(num_tokens, gen, spans_dtype)
    gaps = ~covered(spans, num_tokens)
    assert gaps.any(), "the spans must leave a gap"
    x.view(num_tokens, hidden)[gaps] = float("nan")
    mask = make_span_mask(mask_kind, token_shape, gen)
    return x.to(dtype), spans, mask


def check_span(backend, device, x, spans, mask, mode, exact_dtype=None, seed=0):
    """span_pool's output and dx (poisoned allocations) against the reference's."""
    x, spans = x.to(device), spans.to(device)
    mask = None if mask is None else mask.to(device)
    ref = lambda t: reference.span_pool(t, spans, mask, mode=mode)
    fused = lambda t: fused_pool.span_pool(t, spans, mask, mode=mode, backend=backend)
    expected_out = ref(x)
    grad = torch.randn(expected_out.shape, generator=make_generator(seed), dtype=torch.float64)
    grad = grad.to(device, x.dtype)
    expected_out, (expected_dx,) = outputs_and_grads(ref, [x], grad)
    out, (dx,) = outputs_and_grads(fused, [x], grad, poisoned=True)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == expected_out.shape
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(out, expected_out)
    assert_close(dx, expected_dx)
    assert not dx.isnan().any(), "a token outside the spans got NaN: it was read"
    return out, dx


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mask_kind", SPAN_MASKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["tokens", "padded"])
def test_matches_reference_float64(layout, mode, mask_kind, backend, device):
    token_shape = (40,) if layout == "tokens" else (3, 14)
    seed = stable_seed(layout, mode, mask_kind)
    x, spans, mask = make_inputs(token_shape, 24, torch.float64, mask_kind, seed)
    check_span(backend, device, x, spans, mask, mode, seed=seed)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_low_precision(mode, dtype, backend, device):
    seed = stable_seed(mode, dtype)
    x, spans, mask = make_inputs((37,), 33, dtype, "float", seed, torch.int32)
    check_span(backend, device, x, spans, mask, mode, seed=seed)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_strided_x_spans_and_mask(mode, backend, device):
    gen = make_generator(stable_seed("strided", mode))
    x, spans, mask = make_inputs((30,), 20, torch.float64, "bool", stable_seed("strided", mode))
    x_strided = x.t().contiguous().t()  # (T, H) with strides (1, T)
    spans_strided = spans.t().contiguous().t()  # (S, 2) with strides (1, S)
    mask_strided = torch.stack([mask, torch.rand(30, generator=gen) > 0.5], 1)[:, 0]  # stride 2
    assert not x_strided.is_contiguous() and not spans_strided.is_contiguous()
    out, dx = check_span(backend, device, x_strided, spans_strided, mask_strided, mode)
    contiguous_out, contiguous_dx = check_span(backend, device, x, spans, mask, mode)
    assert_close(out, contiguous_out, exact=True)
    assert_close(dx, contiguous_dx, exact=True)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("spans_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", MODES)
def test_malformed_spans_are_clamped(mode, spans_dtype, backend, device):
    """start > end, negative, beyond T, the index dtype's extremes: clamped, never out of bounds."""
    big, small = torch.iinfo(spans_dtype).max, torch.iinfo(spans_dtype).min
    spans = torch.tensor(
        [[5, 2], [-4, 3], [8, 40], [12, 12], [-7, -1], [20, 30], [small, big], [big, small], [3, big]],
        dtype=spans_dtype,
    )
    gen = make_generator(stable_seed("malformed", mode))
    x = torch.randn(12, 9, generator=gen, dtype=torch.float64)
    out, _ = check_span(backend, device, x, spans, None, mode)
    width = 9
    empty = [0, 3, 4, 5, 7]  # start > end, [12, 12), [-7, -1) and [20, 30) clamp to empty
    assert torch.equal(out[empty, :width], torch.zeros(len(empty), width, dtype=x.dtype, device=device))


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "num_tokens, hidden, spans",
    [
        (7, 5, []),  # S = 0
        (0, 5, [[0, 0], [0, 3], [-1, 2]]),  # T = 0: every span empty
        (9, 1, [[0, 4], [2, 9], [4, 4]]),  # H = 1
        (11, 130, [[0, 11], [3, 5], [3, 5]]),  # H not a power of two, wider than a tile
        (6, 0, [[0, 3], [2, 6]]),  # H = 0
    ],
    ids=["S=0", "T=0", "H=1", "H=130", "H=0"],
)
def test_edge_sizes(mode, num_tokens, hidden, spans, backend, device):
    gen = make_generator(stable_seed("edge", num_tokens, hidden))
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    span_tensor = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    mask = torch.rand(num_tokens, generator=gen) > 0.2
    for m in (None, mask):
        check_span(backend, device, x, span_tensor, m, mode)
    padded = x.reshape(1, num_tokens, hidden)  # (B, L, H) with B = 1, flattened by span_pool
    check_span(backend, device, padded, span_tensor, mask.reshape(1, num_tokens), mode)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic_where_spans_overlap(mode, backend, device):
    """Every span covers nearly every token: each dx sums many spans' gradients, in a fixed order."""
    gen = make_generator(stable_seed("determinism", mode))
    num_tokens, hidden = 64, 48
    x = torch.randn(num_tokens, hidden, generator=gen).to(device)
    starts = torch.randint(0, 4, (40,), generator=gen)
    spans = torch.stack([starts, num_tokens - starts], 1).to(device)
    mask = (torch.rand(num_tokens, generator=gen) * 2).to(device)
    grad = torch.randn(40, 2 * hidden if mode == "mean_max" else hidden, generator=gen).to(device)
    fused = lambda t: fused_pool.span_pool(t, spans, mask, mode=mode, backend=backend)
    first_out, (first_dx,) = outputs_and_grads(fused, [x], grad)
    for _ in range(3):
        out, (dx,) = outputs_and_grads(fused, [x], grad)
        assert torch.equal(out, first_out) and torch.equal(dx, first_dx)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
def test_max_ties_and_nan(backend, device):
    """The max gradient goes to the first maximal kept token of each span; a kept NaN wins."""
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [3.0, float("nan")], [0.0, 5.0]], dtype=torch.float64)
    spans = torch.tensor([[0, 3], [1, 3], [0, 2], [3, 4]])
    check_span(backend, device, x, spans, None, "max")
    check_span(backend, device, x, spans, torch.tensor([1, 1, 0, 1]), "mean_max")


# --- the reference's own semantics, computed by hand ------------------------------------------------


def test_reference_by_hand():
    x = torch.tensor([[1.0], [2.0], [4.0], [float("nan")], [8.0]], dtype=torch.float64)
    spans = torch.tensor([[0, 3], [1, 2], [2, 1], [4, 9], [-5, 1]])
    mean = reference.span_pool(x, spans, mode="mean")
    assert torch.equal(mean, torch.tensor([[7 / 3], [2.0], [0.0], [8.0], [1.0]], dtype=torch.float64))
    weights = torch.tensor([1.0, 0.0, 3.0, 0.0, 0.5], dtype=torch.float64)
    weighted = reference.span_pool(x, spans, weights, mode="mean_max")
    expected = [[13 / 4, 4.0], [0.0, 0.0], [0.0, 0.0], [8.0, 8.0], [1.0, 1.0]]
    assert torch.equal(weighted, torch.tensor(expected, dtype=torch.float64))
    padded = reference.span_pool(x[:4].reshape(2, 2, 1), torch.tensor([[1, 3]]), mode="max")
    assert torch.equal(padded, torch.tensor([[4.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
def test_three_dimensional_x_numbers_tokens_in_flattened_order(backend, device):
    gen = make_generator(1)
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64).to(device)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).to(device)
    spans = torch.tensor([[3, 9], [0, 15], [6, 6]], device=device)
    out = fused_pool.span_pool(x, spans, mask, mode="mean_max", backend=backend)
    flat = fused_pool.span_pool(x.reshape(15, 8), spans, mask.reshape(15), mode="mean_max", backend=backend)
    assert torch.equal(out, flat)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
def test_double_backward_raises(backend, device):
    x = torch.randn(8, 4, device=device, requires_grad=True)
    spans = torch.tensor([[0, 5], [2, 8]], device=device)
    out = fused_pool.span_pool(x, spans, mode="mean_max", backend=backend)
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


# --- a stale extension ------------------------------------------------------------------------------


@pytest.mark.skipif("cpu" not in fused_pool.available_backends(), reason="fused_pool._C is not built")
def test_extension_without_span_ops_asks_for_a_rebuild(monkeypatch):
    """An extension built before the span kind existed: the other kinds run, span raises at call time."""
    for backend in ("cpu", "cuda"):
        monkeypatch.delitem(ops._KERNELS, (backend, "span"), raising=False)
        monkeypatch.delitem(ops._FORWARD_OPS.get(backend, {}), "span", raising=False)
    x = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="cannot run op kind 'span'.*rebuild the extension"):
        fused_pool.span_pool(x, torch.tensor([[0, 3]]), backend="cpu")
    compiled = torch.compile(lambda t: fused_pool.span_pool(t, torch.tensor([[0, 3]]), backend="cpu"))
    with pytest.raises(Exception, match="cannot run op kind 'span'"):
        compiled(x)
    assert_close(fused_pool.masked_mean(x[None], backend="cpu"), x.mean(0, keepdim=True))
