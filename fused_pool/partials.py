"""Partial states of each op kind and their fixed-order combine.

Pooling is a reduction with small partial states. A piece of a sequence (a chunk of its rows, a
rank's shard) reduces to

    mean:          MeanState(total = sum w x, den = sum w)
    max:           MaxState(value, index of the first maximal token within the piece, -1 if none)
    attention:     SoftmaxState(out = sum p x / l, stats = softmax (m, l) per head)
    first / last:  TokenState(row of the first / last kept token, found)

and the pieces of a sequence combine, in sequence-position order, into the state of the whole
sequence, exactly as the kernels' split paths fold their chunks (same tie rules: the first maximal
position wins, a NaN wins over numbers; split softmax merges with weights l_k exp(m_k - M)).

The states come from any backend's forward kernels: the pool forward with the STATES mode bit
(`pool_states`: float32 / float64 sums, not means rebuilt from a rounded output) and the attention
forward as it is (its (out, stats) is a SoftmaxState). The combines
take them stacked along a leading piece axis in position order and fold that axis with elementwise
operations in a fixed order, so that the result is bitwise the same on every device that runs it.
fused_pool.distributed all-gathers these states across ranks; the fused kernels' own split paths
(triton_kernels/, csrc/) keep equivalent partials internally.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .contract import MAX, MEAN, MEAN_MAX


class MeanState(NamedTuple):
    total: Tensor  # (..., H) sum of w x, accumulation dtype
    den: Tensor  # (...,) sum of w


class MaxState(NamedTuple):
    value: Tensor  # (..., H) the maximum (0 if none), accumulation dtype: exact, a selected x
    index: Tensor  # (..., H) int32 index of the first maximal token within the piece, -1 if none


class SoftmaxState(NamedTuple):
    out: Tensor  # (..., H) sum p x / l (0 for an empty head), accumulation dtype
    stats: Tensor  # (..., nh, 2) softmax running max m and sum l; l == 0: empty


class TokenState(NamedTuple):
    row: Tensor  # (..., H) the first / last kept token of the piece (0 if none)
    found: Tensor  # (...,) bool


def pool_states(
    outputs: tuple[Tensor, Tensor, Tensor], mode: int
) -> tuple[MeanState | None, MaxState | None]:
    """The states of a pool forward run with mode | STATES: (out, den, argmax), out in the
    accumulation dtype with the mean half sum(w x), as every backend's kernels write it."""
    out, den, argmax = outputs
    hidden = out.shape[-1] // 2 if mode & MEAN_MAX == MEAN_MAX else out.shape[-1]
    mean = MeanState(out[..., :hidden], den) if mode & MEAN else None
    maximum = MaxState(out[..., -hidden:], argmax) if mode & MAX else None
    return mean, maximum


def combine_mean(pieces: MeanState) -> MeanState:
    """Sums the pieces (leading axis) in order."""
    total, den = pieces.total[0], pieces.den[0]
    for k in range(1, pieces.den.shape[0]):
        total, den = total + pieces.total[k], den + pieces.den[k]
    return MeanState(total, den)


def mean_of(state: MeanState) -> Tensor:
    """sum w x / sum w, 0 where the weights sum to 0."""
    nonzero = (state.den != 0)[..., None]
    return torch.where(nonzero, state.total / torch.where(nonzero, state.den[..., None], 1), 0)


def combine_max(pieces: MaxState) -> tuple[MaxState, Tensor]:
    """(the maximum over the pieces, the int64 piece it comes from (-1 if none)). The first piece
    with a NaN wins, else the first piece holding the maximum: with each piece's first maximal
    index, that is the first maximal position of the whole sequence."""
    value, index = pieces.value[0], pieces.index[0]
    piece = torch.where(index >= 0, 0, -1).long()
    for k in range(1, pieces.value.shape[0]):
        candidate, candidate_index = pieces.value[k], pieces.index[k]
        best_nan = value.isnan() & (index >= 0)
        take = (candidate_index >= 0) & (
            (index < 0) | (candidate.isnan() & ~best_nan) | (~best_nan & (candidate > value))
        )
        value = torch.where(take, candidate, value)
        index = torch.where(take, candidate_index, index)
        piece = torch.where(take, k, piece)
    return MaxState(torch.where(index >= 0, value, 0), index), piece


def combine_softmax(pieces: SoftmaxState) -> SoftmaxState:
    """Merges the pieces in order as split softmax does: out = sum_k w_k out_k / sum_k w_k with
    w_k = l_k exp(m_k - M), M the running max; stats (M, sum_k w_k). Pieces with l = 0 (empty)
    have no say; a piece with l = NaN (its softmax met a NaN or +inf score) makes the head NaN."""
    num_heads = pieces.stats.shape[-2]
    row_max = torch.full_like(pieces.stats[0, ..., 0], float("-inf"))
    den = torch.zeros_like(row_max)
    total = torch.zeros_like(pieces.out[0]).unflatten(-1, (num_heads, -1))
    for k in range(pieces.stats.shape[0]):
        piece_den = pieces.stats[k, ..., 1]
        piece_max = torch.where(piece_den != 0, pieces.stats[k, ..., 0], float("-inf"))  # empty: no say
        new_max = torch.maximum(row_max, piece_max)
        shift = torch.where(new_max == float("-inf"), 0, new_max)
        alpha, beta = torch.exp(row_max - shift), torch.exp(piece_max - shift)
        den = den * alpha + piece_den * beta
        piece_total = pieces.out[k].unflatten(-1, (num_heads, -1)) * piece_den[..., None]
        total = total * alpha[..., None] + piece_total * beta[..., None]
        row_max = new_max
    nonempty = (den != 0)[..., None]  # a NaN piece (NaN or +inf score) makes den, out NaN
    out = torch.where(nonempty, total / torch.where(nonempty, den[..., None], 1), 0).flatten(-2)
    return SoftmaxState(out, torch.stack([row_max, den], -1))


def combine_tokens(pieces: TokenState, which: str) -> tuple[TokenState, Tensor]:
    """(the first / last found token over the pieces, the int64 piece it comes from (-1 if none))."""
    row, found = torch.zeros_like(pieces.row[0]), torch.zeros_like(pieces.found[0])
    piece = torch.full(found.shape, -1, dtype=torch.long, device=found.device)
    for k in range(pieces.found.shape[0]):
        take = pieces.found[k] & (~found if which == "first" else True)
        row = torch.where(take[..., None], pieces.row[k], row)
        piece = torch.where(take, k, piece)
        found = found | pieces.found[k]
    return TokenState(row, found), piece
