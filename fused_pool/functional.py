"""Public pooling functions: check the arguments, pick a backend, run it.

Shapes: padded x (B, L, H) with an optional (B, L) mask (bool / integer: keep where nonzero;
floating: per-token weights for masked_mean, keep where nonzero elsewhere); varlen x (T, H) or
(1, T, H) with cu_seqlens (B + 1,) int32/int64 and no mask. Every op returns (B, H) (mean_max:
(B, 2H)), contiguous, in x's dtype. A sequence with no kept token pools to 0 with zero gradients.
"""

from __future__ import annotations

from torch import Tensor

from . import reference
from ._checks import check_pool_inputs
from .backends import resolve_backend
from .ops import MAX, MEAN, MEAN_MAX, pool

__all__ = ["masked_mean", "masked_max", "masked_mean_max"]


def _pool(x, mask, cu_seqlens, max_seqlen, backend, mode, reference_fn) -> Tensor:
    x = check_pool_inputs(x, mask, cu_seqlens, max_seqlen)
    backend = resolve_backend(backend, x.device)
    if backend == "torch":
        return reference_fn(x, mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return pool(x, mask, cu_seqlens, max_seqlen, mode, backend)


def masked_mean(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Mean of the kept tokens of each sequence: (B, L, H) + (B, L) mask, or (T, H) + cu_seqlens,
    -> (B, H). A floating mask gives the weighted mean sum(w x) / sum(w)."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MEAN, reference.masked_mean)


def masked_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Max over the kept tokens of each sequence -> (B, H). The gradient goes to the first maximal
    kept token; a kept NaN propagates, as in torch.max."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MAX, reference.masked_max)


def masked_mean_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """cat(masked_mean, masked_max) -> (B, 2H), both from one read of x."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MEAN_MAX, reference.masked_mean_max)
