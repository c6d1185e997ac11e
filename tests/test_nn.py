"""fused_pool.nn modules: each against an independent computation, padded and varlen; their
constructors' argument checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import FUSED, assert_close, cu_seqlens_of, make_generator

import fused_pool
from fused_pool import nn as fnn
from fused_pool import reference
from fused_pool.backends import BACKENDS as BACKEND_NAMES

BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu"), *FUSED]


def padded_inputs(device, left=False, seed=0):
    gen = make_generator(seed)
    x = torch.randn(4, 9, 12, generator=gen).to(device)
    lengths = torch.tensor([9, 3, 0, 6])
    positions = torch.arange(9)
    keep = positions >= 9 - lengths[:, None] if left else positions < lengths[:, None]
    return x, keep.to(device)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_mean_max_modules_are_the_functions(backend, device):
    x, mask = padded_inputs(device)
    for module, fn in [
        (fnn.MeanPool, reference.masked_mean),
        (fnn.MaxPool, reference.masked_max),
        (fnn.MeanMaxPool, reference.masked_mean_max),
    ]:
        assert_close(module(backend=backend)(x, mask), fn(x, mask))
        tokens = x[0]
        cu_seqlens = cu_seqlens_of([2, 0, 7], device=device)
        assert_close(
            module(backend=backend)(tokens, cu_seqlens=cu_seqlens, max_seqlen=7),
            fn(tokens, cu_seqlens=cu_seqlens),
        )


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_cls_and_last_token(left):
    x, mask = padded_inputs("cpu", left=left)
    first, last = fnn.CLSPool()(x, mask), fnn.LastTokenPool()(x, mask)
    for b in range(x.shape[0]):
        kept = mask[b].nonzero().flatten().tolist()
        assert torch.equal(first[b], x[b, kept[0]] if kept else torch.zeros(12))
        assert torch.equal(last[b], x[b, kept[-1]] if kept else torch.zeros(12))
    assert torch.equal(fnn.CLSPool()(x), x[:, 0]) and torch.equal(fnn.LastTokenPool()(x), x[:, -1])


def test_cls_and_last_token_varlen_and_gradients():
    tokens = torch.randn(10, 5, requires_grad=True)
    cu_seqlens = cu_seqlens_of([4, 0, 6])
    first, last = (
        fnn.CLSPool()(tokens, cu_seqlens=cu_seqlens),
        fnn.LastTokenPool()(tokens, cu_seqlens=cu_seqlens),
    )
    assert torch.equal(first, torch.stack([tokens[0], torch.zeros(5), tokens[4]]))
    assert torch.equal(last, torch.stack([tokens[3], torch.zeros(5), tokens[9]]))
    (grad,) = torch.autograd.grad(first.sum() + 2 * last.sum(), tokens)
    expected = torch.zeros(10, 5)
    expected[[0, 4]] = 1
    expected[[3, 9]] = 2
    assert torch.equal(grad, expected)
    one_token = fnn.CLSPool()(tokens[:1], cu_seqlens=cu_seqlens_of([1]))
    assert torch.equal(one_token, tokens[:1])


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("heads", [1, 3])
def test_attention_pool_query(backend, device, heads):
    x, mask = padded_inputs(device)
    module = fnn.AttentionPool(12, num_heads=heads, backend=backend).to(device)
    # Zero-initialized query: uniform weights, i.e. the masked mean.
    assert_close(module(x, mask), reference.masked_mean(x, mask))
    with torch.no_grad():
        module.query.copy_(torch.randn(module.query.shape, generator=make_generator(1)))
    assert_close(module(x, mask), reference.query_attention_pool(x, module.query, mask))
    module(x, mask).sum().backward()
    assert module.query.grad is not None and module.query.grad.abs().sum() > 0


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_attention_pool_mlp(backend, device):
    torch.manual_seed(0)
    x, mask = padded_inputs(device)
    module = fnn.AttentionPool(12, num_heads=2, scorer="mlp", mlp_hidden=7, backend=backend).to(device)
    scores = module.scorer(x)
    assert_close(module(x, mask), reference.attention_pool(x, scores, mask))
    module(x, mask).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.scorer.parameters())
    tokens, cu_seqlens = x[0], cu_seqlens_of([4, 5], device=device)
    assert_close(
        module(tokens[None], cu_seqlens=cu_seqlens),
        reference.attention_pool(tokens, module.scorer(tokens), cu_seqlens=cu_seqlens),
    )


def test_attention_pool_arguments():
    with pytest.raises(ValueError, match="num_heads = 5 must divide hidden_size = 12"):
        fnn.AttentionPool(12, num_heads=5)
    with pytest.raises(ValueError, match="scorer must be 'query' or 'mlp'"):
        fnn.AttentionPool(12, scorer="gru")


class RecordingMean(fnn.MeanPool):
    """MeanPool that records the inputs it was called with."""

    def __init__(self):
        super().__init__(backend="torch")
        self.seen = []

    def forward(self, hidden_states, *args, **kwargs):
        self.seen.append(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


def layers_of(device, count=7, seed=2):
    gen = make_generator(seed)
    return tuple(torch.randn(3, 5, 8, generator=gen).to(device) for _ in range(count))


def test_weighted_layer_pool_linear_base_pools_each_layer():
    layers, mask = layers_of("cpu"), torch.rand(3, 5, generator=make_generator(3)) > 0.3
    base = RecordingMean()
    module = fnn.WeightedLayerPool(
        num_layers=6, layer_start=2, base=base, layer_weights=torch.arange(1.0, 6.0)
    )
    out = module(layers, mask)
    weights = torch.arange(1.0, 6.0) / 15
    stacked = torch.stack(layers[2:])  # the formula, written the expensive way
    expected = reference.masked_mean((weights[:, None, None, None] * stacked).sum(0), mask)
    assert_close(out, expected)
    assert all(
        seen is layer for seen, layer in zip(base.seen, layers[2:], strict=True)
    )  # never a mixed tensor
    out.sum().backward()
    assert module.layer_weights.grad is not None


def test_weighted_layer_pool_nonlinear_base_mixes_layers():
    layers, mask = layers_of("cpu"), torch.rand(3, 5, generator=make_generator(4)) > 0.3
    module = fnn.WeightedLayerPool(num_layers=6, layer_start=4, base=fnn.MaxPool(backend="torch"))
    mixed = torch.stack(layers[4:]).mean(0)
    assert_close(module(layers, mask), reference.masked_max(mixed, mask))
    with pytest.raises(ValueError, match="needs a sequence of at least 7 layer outputs"):
        module(layers[:3], mask)
    with pytest.raises(ValueError, match="layer_weights must have 3 entries"):
        fnn.WeightedLayerPool(num_layers=6, layer_start=4, layer_weights=torch.ones(2))


def test_concat_layers_pool():
    layers, mask = layers_of("cpu"), torch.rand(3, 5, generator=make_generator(5)) > 0.3
    out = fnn.ConcatLayersPool(num_layers=3, base=fnn.MaxPool(backend="torch"))(layers, mask)
    expected = torch.cat([reference.masked_max(layers[i], mask) for i in (-1, -2, -3)], -1)
    assert torch.equal(out, expected)
    # For a channel-wise base, pooling each layer equals pooling the concatenated layers.
    assert torch.equal(out, reference.masked_max(torch.cat([layers[-1], layers[-2], layers[-3]], -1), mask))
    tokens = [layer[0] for layer in layers]
    varlen = fnn.ConcatLayersPool(2)(tokens, cu_seqlens=cu_seqlens_of([2, 3]))
    assert varlen.shape == (2, 16)


def test_modules_reachable_from_the_package():
    assert fused_pool.nn.MeanPool is fnn.MeanPool and fused_pool.nn.Pooling is fnn.Pooling


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("max_seqlen", [None, 3])
def test_varlen_weights_mean(backend, device, max_seqlen):
    """masked_mean's varlen (T,) weights, forward and backward, against the reference and by hand."""
    gen = make_generator(6)
    # A 300-token sequence: the Triton kernel splits it across programs (no max_seqlen hint).
    lengths = [4, 0, 1, 300, 3] if max_seqlen is None else [3, 0, 1, 2]
    tokens = torch.randn(sum(lengths), 12, generator=gen).to(device)
    weights = (torch.rand(sum(lengths), generator=gen) * 1.75 + 0.25).to(device)
    weights[-1] = 0  # a zero weight drops its token
    cu_seqlens = cu_seqlens_of(lengths, device=device)
    grad = torch.randn(len(lengths), 12, generator=gen).to(device)
    leaves = [tokens.clone().requires_grad_() for _ in range(2)]
    out = fnn.MeanPool(backend=backend)(leaves[0], weights, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    expected = reference.masked_mean(leaves[1], weights, cu_seqlens=cu_seqlens)
    assert_close(out, expected)
    (dx,) = torch.autograd.grad(out, leaves[0], grad)
    (dx_expected,) = torch.autograd.grad(expected, leaves[1], grad)
    assert_close(dx, dx_expected)
    starts = [0, *itertools.accumulate(lengths)]
    by_hand = torch.stack(
        [
            (tokens[a:b] * weights[a:b, None]).sum(0) / weights[a:b].sum() if b > a else tokens.new_zeros(12)
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ]
    )
    assert_close(expected, by_hand)
    assert_close(
        fused_pool.masked_mean(tokens[None], weights, cu_seqlens=cu_seqlens, backend=backend), by_hand
    )


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_varlen_weights_only_for_mean(backend, device):
    tokens, cu_seqlens = torch.randn(5, 4, device=device), cu_seqlens_of([2, 3], device=device)
    for fn in (fused_pool.masked_max, fused_pool.masked_mean_max):
        with pytest.raises(ValueError, match="mask must be None when cu_seqlens is given"):
            fn(tokens, torch.ones(5, device=device), cu_seqlens=cu_seqlens, backend=backend)
    with pytest.raises(TypeError, match=r"linear_pool, floating per-token weights \(T,\); got dtype"):
        fused_pool.masked_mean(tokens, torch.ones(5, dtype=torch.bool, device=device), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"per-token weights of shape \(T,\) = \(5,\) matching x \(5, 4\)"):
        fused_pool.masked_mean(tokens, torch.ones(1, 5, device=device), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_weighted_mean_pool(backend, device, left):
    """Weights 1, 2, ..., n from each sequence's first kept token (sentence-transformers' weightedmean)."""
    x, mask = padded_inputs(device, left=left, seed=7)
    out = fnn.WeightedMeanPool(backend=backend)(x, mask)
    for b in range(x.shape[0]):
        kept = mask[b].nonzero().flatten()
        if not len(kept):
            assert not out[b].any()
            continue
        weights = torch.arange(1.0, len(kept) + 1, device=device)
        assert_close(out[b], (x[b, kept] * weights[:, None]).sum(0) / weights.sum())
    tokens, cu_seqlens = x[0], cu_seqlens_of([2, 0, 7], device=device)
    varlen = fnn.WeightedMeanPool(backend=backend)(tokens, cu_seqlens=cu_seqlens)
    weights = torch.tensor([1.0, 2, 1, 2, 3, 4, 5, 6, 7], device=device)
    by_hand = torch.stack(
        [
            (tokens[:2] * weights[:2, None]).sum(0) / 3,
            tokens.new_zeros(12),
            (tokens[2:] * weights[2:, None]).sum(0) / 28,
        ]
    )
    assert_close(varlen, by_hand)
    pool = fnn.WeightedMeanPool(backend=backend)
    assert_close(pool(x), pool(x, torch.ones_like(mask)))  # no mask: every token kept


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_weighted_mean_pool_checks_its_arguments_first(backend, device):
    """L = 0 pools to zeros like MeanPool; a bad mask is a ValueError naming it, not an error from
    the position weights; varlen takes no mask (positions count from each sequence's start)."""
    pool, mean = fnn.WeightedMeanPool(backend=backend), fnn.MeanPool(backend=backend)
    for batch, length in ((3, 0), (0, 0), (0, 4)):
        x = torch.randn(batch, length, 12, device=device, requires_grad=True)
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        for given in (mask, None):
            out = pool(x, given)
            assert torch.equal(out, torch.zeros(batch, 12, device=device))
            assert torch.equal(out, mean(x, given))
            (dx,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(dx, torch.zeros_like(x))
    x = torch.randn(2, 5, 12, device=device)
    for bad in (
        torch.ones(2, 4, device=device),
        torch.ones(5, 2, device=device),
        torch.ones(2, device=device),
    ):
        with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 5\)"):
            pool(x, bad)
    tokens, cu_seqlens = x[0], cu_seqlens_of([2, 3], device=device)
    for mask in (torch.ones(5, device=device), torch.ones(5, dtype=torch.bool, device=device)):
        with pytest.raises(ValueError, match="mask must be None when cu_seqlens is given"):
            pool(tokens, mask, cu_seqlens=cu_seqlens)


def test_dense_pooler():
    torch.manual_seed(0)
    x, mask = padded_inputs("cpu", left=True, seed=8)
    pooler = fnn.DensePooler(12)
    cls = fnn.CLSPool()(x, mask)
    assert torch.equal(pooler(x, mask), torch.tanh(pooler.dense(cls)))
    on_mean = fnn.DensePooler(12, activation="gelu", base=fnn.MeanPool(backend="torch"))
    expected = torch.nn.functional.gelu(on_mean.dense(reference.masked_mean(x, mask)))
    assert_close(on_mean(x, mask), expected)
    assert on_mean.output_size(12) == 12 and not on_mean.takes_layers
    assert fnn.DensePooler(12, activation=torch.nn.Softsign()).activation_name is None
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.DensePooler(12, activation="swish")
    with pytest.raises(TypeError, match="activation must be a str or an nn.Module"):
        fnn.DensePooler(12, activation=3)
    with pytest.raises(ValueError, match="DensePooler was built for hidden_size = 12"):
        fnn.DensePooler(12).output_size(16)
    layered = fnn.DensePooler(8, base=fnn.WeightedLayerPool(num_layers=6, layer_start=2))
    assert layered.takes_layers
    layers = layers_of("cpu")
    assert_close(layered(layers), torch.tanh(layered.dense(layered.base(layers))))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_dense_pooler_takes_its_base_width(backend, device):
    """A (B, 2H) base such as MeanMaxPool gets dense = Linear(2H, H): built, run and sized as such."""
    torch.manual_seed(0)
    x, mask = padded_inputs(device, seed=10)
    pooler = fnn.DensePooler(12, base=fnn.MeanMaxPool(backend=backend)).to(device)
    assert (pooler.dense.in_features, pooler.dense.out_features) == (24, 12) and pooler.output_size(12) == 12
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    out = pooler(leaves[0], mask)
    expected = torch.tanh(pooler.dense(reference.masked_mean_max(leaves[1], mask)))
    assert out.shape == (4, 12)
    assert_close(out, expected)
    grad = torch.randn(out.shape, generator=make_generator(11)).to(device)
    assert_close(
        torch.autograd.grad(out, leaves[0], grad)[0], torch.autograd.grad(expected, leaves[1], grad)[0]
    )


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("base", ["mean", "max"], ids=["linear_base", "mixing_base"])
def test_weighted_layer_pool_weights_summing_to_zero(backend, device, base):
    """Rejected as initial weights; learned weights that come to sum to 0 give 0, never NaN."""
    for bad in ([1.0, -2.0, 1.0], [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="layer_weights must be finite and must not sum to 0"):
            fnn.WeightedLayerPool(6, layer_start=4, layer_weights=torch.tensor(bad))
    with torch.device("meta"):  # from_pretrained's empty init: values unknown, nothing to check
        assert fnn.WeightedLayerPool(6, layer_start=4).layer_weights.is_meta
    pool = fnn.MeanPool(backend=backend) if base == "mean" else fnn.MaxPool(backend=backend)
    module = fnn.WeightedLayerPool(6, layer_start=4, base=pool).to(device)
    layers = [layer.requires_grad_() for layer in layers_of(device)]
    mask = (torch.rand(3, 5, generator=make_generator(12)) > 0.3).to(device)
    by_reference = reference.masked_mean if base == "mean" else reference.masked_max
    assert_close(module(layers, mask), by_reference(torch.stack(layers[4:]).mean(0), mask))
    with torch.no_grad():
        module.layer_weights.copy_(torch.tensor([1.0, -2.0, 1.0]))  # a training step could get here
    out = module(layers, mask)
    assert torch.equal(out, torch.zeros(3, 8, device=device))
    grads = torch.autograd.grad(out.sum(), [module.layer_weights, *layers[4:]])
    assert all(torch.isfinite(g).all() for g in grads)


def test_lstm_pool():
    torch.manual_seed(0)
    layers, mask = layers_of("cpu"), torch.rand(3, 5, generator=make_generator(9)) > 0.3
    mask[:, 0] = True
    module = fnn.LSTMPool(8, 6, layer_start=2, base=fnn.MeanPool(backend="torch"))
    rows = torch.stack([reference.masked_mean(layer, mask) for layer in layers[2:]], dim=1)
    expected = module.lstm(rows)[0][:, -1]
    out = module(layers, mask)
    assert out.shape == (3, 6) and module.takes_layers and module.output_size(8) == 6
    assert_close(out, expected)
    # By hand: the last step of a one-layer LSTM run over the 5 pooled layers.
    lstm, (h, c) = module.lstm, (torch.zeros(3, 6), torch.zeros(3, 6))
    for t in range(rows.shape[1]):
        gates = rows[:, t] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
    assert_close(out, h)
    out.sum().backward()
    assert all(p.grad is not None for p in module.lstm.parameters())
    default = fnn.LSTMPool(8, 4)  # CLS of every layer but the embeddings
    tokens = [layer[0] for layer in layers]
    varlen = default(tokens, cu_seqlens=cu_seqlens_of([2, 3]))
    cls_rows = torch.stack([layer[[0, 2]] for layer in tokens[1:]], dim=1)
    assert_close(varlen, default.lstm(cls_rows)[0][:, -1])
    with pytest.raises(ValueError, match="LSTMPool needs a sequence of at least 3 layer outputs"):
        module(layers[:2], mask)
    with pytest.raises(ValueError, match="LSTMPool was built for hidden_size = 8, but its base gives 16"):
        fnn.LSTMPool(8, 4, base=fnn.MeanMaxPool())(layers, mask)
    with pytest.raises(ValueError, match="layer_start must be >= 0"):
        fnn.LSTMPool(8, 4, layer_start=-1)


def test_output_sizes_and_layer_flags():
    assert [m.output_size(12) for m in (fnn.MeanPool(), fnn.MaxPool(), fnn.MeanMaxPool(), fnn.CLSPool())] == [
        12,
        12,
        24,
        12,
    ]
    assert fnn.ConcatLayersPool(3, base=fnn.MeanMaxPool()).output_size(12) == 72
    assert fnn.WeightedLayerPool(6).output_size(12) == 12 and fnn.WeightedLayerPool(6).takes_layers
    assert fnn.AttentionPool(12).output_size(12) == 12 and not fnn.AttentionPool(12).takes_layers
    with pytest.raises(
        ValueError, match="AttentionPool was built for hidden_size = 12, but the hidden states have 8"
    ):
        fnn.AttentionPool(12).output_size(8)


# --- constructors refuse bad arguments at once, with an error that names the argument (not at
# forward, and not with an unrelated message from deep inside torch) -------------------------------


BAD_CONSTRUCTIONS = [
    # (constructor, args, kwargs, error, message)
    (fnn.AttentionPool, (-8,), {}, ValueError, "hidden_size must be >= 1, got -8"),
    (fnn.AttentionPool, (0,), {}, ValueError, "hidden_size must be >= 1, got 0"),
    (fnn.AttentionPool, ("8",), {}, TypeError, "hidden_size must be an int, got str"),
    (fnn.AttentionPool, (8.0,), {}, TypeError, "hidden_size must be an int, got float"),
    (fnn.AttentionPool, (True,), {}, TypeError, "hidden_size must be an int, got bool"),
    (fnn.AttentionPool, (8,), {"num_heads": 2.0}, TypeError, "num_heads must be an int, got float"),
    (fnn.AttentionPool, (8,), {"num_heads": 0}, ValueError, "num_heads must be >= 1, got 0"),
    (fnn.AttentionPool, (8,), {"num_heads": -2}, ValueError, "num_heads must be >= 1, got -2"),
    (fnn.AttentionPool, (8,), {"num_heads": 3}, ValueError, "num_heads = 3 must divide hidden_size = 8"),
    (fnn.AttentionPool, (8,), {"scorer": "mlp", "mlp_hidden": -1}, ValueError, "mlp_hidden must be >= 1"),
    (fnn.AttentionPool, (8,), {"scorer": "mlp", "mlp_hidden": 0}, ValueError, "mlp_hidden must be >= 1"),
    (fnn.AttentionPool, (8,), {"mlp_hidden": "512"}, TypeError, "mlp_hidden must be an int, got str"),
    (fnn.AttentionPool, (8,), {"scorer": "gru"}, ValueError, "scorer must be 'query' or 'mlp'"),
    (fnn.DensePooler, (0,), {}, ValueError, "hidden_size must be >= 1, got 0"),
    (fnn.DensePooler, (8.5,), {}, TypeError, "hidden_size must be an int, got float"),
    (
        fnn.DensePooler,
        (8,),
        {"base": fnn.AttentionPool(12)},
        ValueError,
        "AttentionPool was built for hidden_size = 12",
    ),
    (fnn.WeightedLayerPool, (6.0,), {}, TypeError, "num_layers must be an int, got float"),
    (fnn.WeightedLayerPool, (-1,), {}, ValueError, "num_layers must be >= 0, got -1"),
    (fnn.WeightedLayerPool, (6,), {"layer_start": -1}, ValueError, "layer_start must be >= 0, got -1"),
    (
        fnn.WeightedLayerPool,
        (6,),
        {"layer_start": 7},
        ValueError,
        r"layer_start = 7 must be in \[0, num_layers",
    ),
    (
        fnn.WeightedLayerPool,
        (2,),
        {"layer_start": 0, "layer_weights": [1.0, 1.0, 1.0]},
        TypeError,
        "layer_weights must be a",
    ),
    (fnn.ConcatLayersPool, (0,), {}, ValueError, "num_layers must be >= 1, got 0"),
    (fnn.ConcatLayersPool, ("4",), {}, TypeError, "num_layers must be an int, got str"),
    (fnn.LSTMPool, (8, 0), {}, ValueError, "lstm_hidden_size must be >= 1, got 0"),
    (fnn.LSTMPool, (-8, 4), {}, ValueError, "hidden_size must be >= 1, got -8"),
    (fnn.LSTMPool, (8, 4.0), {}, TypeError, "lstm_hidden_size must be an int, got float"),
    (fnn.LSTMPool, (8, 4), {"layer_start": -1}, ValueError, "layer_start must be >= 0, got -1"),
]


@pytest.mark.parametrize(
    "constructor, args, kwargs, error, message",
    BAD_CONSTRUCTIONS,
    ids=[f"{c.__name__}-{i}" for i, (c, *_) in enumerate(BAD_CONSTRUCTIONS)],
)
def test_bad_constructor_arguments(constructor, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        constructor(*args, **kwargs)


def test_integer_like_sizes_are_accepted():
    pool = fnn.AttentionPool(np.int64(8), num_heads=np.int32(2), scorer="mlp", mlp_hidden=np.int64(4))
    assert (pool.hidden_size, pool.num_heads, pool.mlp_hidden) == (8, 2, 4)
    assert type(pool.hidden_size) is int
    assert pool(torch.randn(2, 3, 8)).shape == (2, 8)


BACKEND_MODULES = [
    lambda backend: fnn.MeanPool(backend=backend),
    lambda backend: fnn.MaxPool(backend=backend),
    lambda backend: fnn.MeanMaxPool(backend=backend),
    lambda backend: fnn.WeightedMeanPool(backend=backend),
    lambda backend: fnn.CLSPool(backend=backend),
    lambda backend: fnn.LastTokenPool(backend=backend),
    lambda backend: fnn.AttentionPool(8, backend=backend),
    lambda backend: fnn.AttentionPool(8, scorer="mlp", mlp_hidden=4, backend=backend),
]


@pytest.mark.parametrize("make", BACKEND_MODULES)
def test_module_backend_is_checked_at_construction(make):
    with pytest.raises(
        ValueError, match=r"backend must be one of \('triton', 'cuda', 'cpu', 'torch'\) or None"
    ):
        make("nope")
    with pytest.raises(TypeError, match="backend must be a str or None, got int"):
        make(1)
    for name in (None, *BACKEND_NAMES):  # a known name is accepted; whether it can run is decided at forward
        assert make(name).backend == name


def test_backend_that_cannot_run_is_refused_at_forward():
    pool = fnn.MeanPool(backend="cuda")
    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run on CUDA tensors here")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        pool(torch.randn(2, 3, 8))
