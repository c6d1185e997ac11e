"""fused_pool: fused kernels that pool transformer hidden states into one vector per sequence."""

from ._checks import validate_cu_seqlens
from .backends import available_backends
from .functional import masked_max, masked_mean, masked_mean_max

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "validate_cu_seqlens",
]
