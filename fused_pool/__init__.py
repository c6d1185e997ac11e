"""fused_pool: fused kernels that pool transformer hidden states into one vector per sequence."""

from ._checks import validate_cu_seqlens
from .backends import available_backends
from .functional import attention_pool, masked_max, masked_mean, masked_mean_max, query_attention_pool

__version__ = "0.1.0"

__all__ = [
    "attention_pool",
    "available_backends",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "query_attention_pool",
    "validate_cu_seqlens",
]
