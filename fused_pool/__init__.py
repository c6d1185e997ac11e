"""fused_pool: fused kernels that pool transformer hidden states into one vector per sequence."""

from . import nn, reference
from ._checks import validate_cu_seqlens
from .backends import available_backends
from .functional import (
    attention_pool,
    first_token,
    last_token,
    linear_pool,
    masked_max,
    masked_mean,
    masked_mean_max,
    probe_attention_pool,
    query_attention_pool,
    span_pool,
)
from .padding import Unpadded, cu_seqlens_from_mask, cu_seqlens_from_position_ids, pad, unpad

__version__ = "0.1.0"

__all__ = [
    "Unpadded",
    "attention_pool",
    "available_backends",
    "cu_seqlens_from_mask",
    "cu_seqlens_from_position_ids",
    "first_token",
    "last_token",
    "linear_pool",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "nn",
    "pad",
    "probe_attention_pool",
    "query_attention_pool",
    "reference",
    "span_pool",
    "unpad",
    "validate_cu_seqlens",
]
