"""Drop-in pooling modules on the fused kernels.

| module | output |
|---|---|
| MeanPool, MaxPool, MeanMaxPool | (B, H), (B, H), (B, 2H) |
| CLSPool, LastTokenPool | (B, H): first / last kept token (left or right padding, varlen) |
| WeightedMeanPool | (B, H): position-weighted mean (sentence-transformers' weightedmean) |
| AttentionPool(hidden_size, num_heads=1, scorer="query" or "mlp", mlp_hidden=512) | (B, H) |
| DensePooler(hidden_size, activation="tanh", base=CLSPool()) | (B, H): BERT's pooler, on any model |
| WeightedLayerPool(num_layers, layer_start=4, base=MeanPool()) | base over learned layer weights |
| ConcatLayersPool(num_layers=4, base=MeanPool()) | cat of base over the last layers |
| LSTMPool(hidden_size, lstm_hidden_size, layer_start=1, base=CLSPool()) | (B, lstm_hidden_size) |
| Pooling | drop-in for sentence-transformers' Pooling |
| MAPHead(hidden_size, num_heads, num_probes=1), .from_siglip, .from_aimv2 | (B, H) or (B, P, H) |
| LinearPool(in_features, out_features, mode="max", activation=None) | (B, out_features), fused |
| SpladeHead.from_masked_lm(model, pooling="max") | (B, vocab): a masked LM's head, SPLADE |
"""

from .layers import ConcatLayersPool, LSTMPool, WeightedLayerPool
from .linear import LinearPool, SpladeHead
from .map_head import MAPHead
from .pools import (
    AttentionPool,
    CLSPool,
    DensePooler,
    LastTokenPool,
    MaxPool,
    MeanMaxPool,
    MeanPool,
    WeightedMeanPool,
)
from .sentence_pooling import Pooling

__all__ = [
    "AttentionPool",
    "CLSPool",
    "ConcatLayersPool",
    "DensePooler",
    "LSTMPool",
    "LastTokenPool",
    "LinearPool",
    "MAPHead",
    "MaxPool",
    "MeanMaxPool",
    "MeanPool",
    "Pooling",
    "SpladeHead",
    "WeightedLayerPool",
    "WeightedMeanPool",
]
