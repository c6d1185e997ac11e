"""first_token / last_token: the first or last kept token of each sequence (CLS, a decoder's last
token), 0 for a sequence with no kept token.

One gather of B rows on every backend (nothing to fuse); the gradient goes to that token only. No
host sync: positions come from the mask or cu_seqlens on the device. `token_positions` is shared
with fused_pool.distributed, which runs it on each rank's pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_pool_inputs
from .padding import segment_bounds

__all__ = ["first_token", "last_token", "gather_tokens", "token_positions"]

_WHICH = ("first", "last")


def token_positions(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, which: str
) -> tuple[Tensor, Tensor]:
    """(position (B,) int64, found (B,) bool) of each sequence's first / last kept token: the index
    along L for padded x (B, L, H), the row for varlen x (T, H). Where nothing is found the
    position may be out of range."""
    if cu_seqlens is not None:
        starts, ends = segment_bounds(cu_seqlens, x.shape[0])
        return (starts if which == "first" else ends - 1), ends > starts
    batch, length = x.shape[:2]
    kept = torch.ones(batch, length, dtype=torch.bool, device=x.device) if mask is None else mask != 0
    positions = torch.arange(length, device=x.device)
    if length == 0:  # amin / amax of nothing: every sequence is empty
        return positions.new_zeros(batch), kept.new_zeros(batch)
    if which == "first":
        position = torch.where(kept, positions, length).amin(1)
        return position, position < length
    position = torch.where(kept, positions, -1).amax(1)
    return position, position >= 0


def gather_tokens(x: Tensor, position: Tensor, found: Tensor) -> Tensor:
    """(B, H): x at each sequence's `position` (padded: along L; varlen: the row), 0 where not
    `found`. Differentiable: the gradient goes to the gathered tokens only."""
    batch, hidden, length = found.shape[0], x.shape[-1], x.shape[-2]
    if length == 0:  # no token at all: every sequence is empty (kept differentiable)
        return (x.sum(-2) * 0).expand(batch, hidden).contiguous()
    position = position.clamp(0, length - 1)
    # index_select / advanced indexing: their backward keeps x's shape, not x (gather keeps x)
    if x.dim() == 2:
        rows = x.index_select(0, position)
    else:
        rows = x[torch.arange(batch, device=x.device), position]
    return torch.where(found[:, None], rows, 0)


def _select(x, mask, cu_seqlens, which) -> Tensor:
    x = check_pool_inputs(x, mask, cu_seqlens, None)
    position, found = token_positions(x, mask, cu_seqlens, which)
    return gather_tokens(x, position, found)


def first_token(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """(B, H): the first kept token of each sequence (the CLS token, with left or right padding,
    or varlen), 0 for a sequence with no kept token; the gradient goes to that token only."""
    return _select(x, mask, cu_seqlens, "first")


def last_token(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """(B, H): the last kept token of each sequence (a decoder's summary token, with left or right
    padding, or varlen), 0 for a sequence with no kept token; the gradient goes to that token only."""
    return _select(x, mask, cu_seqlens, "last")
