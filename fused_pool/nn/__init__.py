"""Drop-in pooling modules on the fused kernels.

| module | output |
|---|---|
| MeanPool, MaxPool, MeanMaxPool | (B, H), (B, H), (B, 2H) |
| CLSPool, LastTokenPool | (B, H): first / last kept token (left or right padding, varlen) |
| AttentionPool(hidden_size, num_heads=1, scorer="query" or "mlp", mlp_hidden=512) | (B, H) |
| WeightedLayerPool(num_layers, layer_start=4, base=MeanPool()) | base over learned layer weights |
| ConcatLayersPool(num_layers=4, base=MeanPool()) | cat of base over the last layers |
| Pooling | drop-in for sentence-transformers' Pooling |
"""

from .layers import ConcatLayersPool, WeightedLayerPool
from .pools import AttentionPool, CLSPool, LastTokenPool, MaxPool, MeanMaxPool, MeanPool
from .sentence_pooling import Pooling

__all__ = [
    "AttentionPool",
    "CLSPool",
    "ConcatLayersPool",
    "LastTokenPool",
    "MaxPool",
    "MeanMaxPool",
    "MeanPool",
    "Pooling",
    "WeightedLayerPool",
]
