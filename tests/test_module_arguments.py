"""fused_pool.nn constructors refuse bad arguments at once, with an error that names the argument
(not at forward, and not with an unrelated message from deep inside torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fused_pool import nn as fnn
from fused_pool.backends import BACKENDS

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


# Every module with a backend= argument.
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
    for name in (None, *BACKENDS):  # a known name is accepted; whether it can run is decided at forward
        assert make(name).backend == name


def test_backend_that_cannot_run_is_refused_at_forward():
    pool = fnn.MeanPool(backend="cuda")
    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run on CUDA tensors here")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        pool(torch.randn(2, 3, 8))
