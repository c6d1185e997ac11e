"""The facts every kernel of every backend shares: the pool mode bits, the partial-state flag, the
accumulation dtype rule and the batch size of a padded or varlen input.

A leaf module: it imports nothing from fused_pool, so that the kernels (fused_pool.torch_kernels,
fused_pool.triton_kernels), the partial states, the reference, the specs, the tests and the CI
checks can all import it without a cycle. The C++ side mirrors these values in csrc/common.h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MEAN, MAX, MEAN_MAX = 1, 2, 3  # pool mode bits: 1 = mean, 2 = max
STATES = 4  # forward only: out holds the partial states (sum of w x, max) in the accumulation dtype
SUM = 8  # linear_pool only: the weighted sum over the kept tokens, not divided by their weight

# linear_pool's activations, applied to each projected value z before the pooling; the kernels get
# the index. "gelu" is the erf form (torch.nn.functional.gelu); "log1p_relu" is SPLADE's log(1 + relu z).
ACTIVATIONS = ("none", "relu", "log1p_relu", "log1p_log1p_relu", "gelu", "tanh", "silu")


def log1p_relu(z: Tensor) -> Tensor:
    return torch.log1p(torch.relu(z))


# Each activation as PyTorch computes it (the reference and the "torch" backend apply these; the
# tests check them against formulas written out).
ACTIVATION_FUNCTIONS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "log1p_relu": log1p_relu,
    "log1p_log1p_relu": lambda z: torch.log1p(log1p_relu(z)),
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every backend accumulates in float32, float64 for float64 inputs; softmax statistics too."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_seqs(x: Tensor, cu_seqlens: Tensor | None) -> int:
    """B: x's leading dimension when padded (B, L, H), len(cu_seqlens) - 1 when varlen (T, H)."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
