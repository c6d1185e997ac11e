"""How a rank's tokens map onto the global sequences: `shard` (cut a global tensor into rank r's
piece) and `local_pieces` (the rank's tokens as the local kernels see them).

Layouts, for W ranks:

- "contiguous": the sequence axis (padded L, or the packed token axis T) is cut into W slices in
  rank order; slices may be uneven or empty and sequences may straddle ranks.
- "zigzag" (TransformerEngine / Megatron load balancing): every sequence is cut into 2W equal
  slices and rank r holds slices r and 2W-1-r, concatenated. Padded: L divisible by 2W. Varlen:
  `cu_seqlens_padded` (every padded length divisible by 2W) defines the slicing, `cu_seqlens` the
  real lengths; tokens past a sequence's real length are padding.

A slice is named by its index k in sequence-position order (contiguous: k = rank; zigzag: rank r
holds k = r and k = 2W-1-r). The combine folds the slices of each sequence in k order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def slices_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def slice_indices(layout: str, rank: int, world_size: int) -> list[int]:
    """Position-order indices of the slices rank `rank` holds, in the order it holds them."""
    return [rank, 2 * world_size - 1 - rank] if layout == "zigzag" else [rank]


def slice_owners(layout: str, world_size: int) -> list[int]:
    """For each slice k in position order, its place in the all-gathered (rank, slot) states,
    flattened as rank * slices_per_rank + slot."""
    slots = slices_per_rank(layout)
    places = {
        k: rank * slots + slot
        for rank in range(world_size)
        for slot, k in enumerate(slice_indices(layout, rank, world_size))
    }
    return [places[k] for k in range(len(places))]


# --- preparing inputs -----------------------------------------------------------------------------


def shard(
    t: Tensor,
    *,
    rank: int,
    world_size: int,
    layout: str = "contiguous",
    dim: int = 1,
    cu_seqlens_padded: Tensor | None = None,
) -> Tensor:
    """Rank `rank`'s piece of a global tensor `t` along `dim` (the sequence axis: 1 for padded
    (B, L, ...), 0 for packed (T, ...)), for users preparing inputs and for tests.

    contiguous: the rank's slice of W near-equal slices (torch.tensor_split). zigzag: slices r and
    2W-1-r of 2W equal slices, of the whole axis, or of every sequence of a packed batch when
    `cu_seqlens_padded` is given (reads it to the host). Returns a view where it can (contiguous).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    for name, value in (("rank", rank), ("world_size", world_size), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) and world_size >= 1, got rank {rank}, world_size {world_size}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim must index one of t's {t.dim()} dimensions, got {dim}")
    if layout == "contiguous":
        if cu_seqlens_padded is not None:
            raise ValueError("cu_seqlens_padded is only used by layout='zigzag'")
        return torch.tensor_split(t, world_size, dim)[rank]
    parts = 2 * world_size
    if cu_seqlens_padded is None:
        if t.shape[dim] % parts:
            raise ValueError(
                f"layout='zigzag' cuts dim {dim} into 2W = {parts} equal slices: its size "
                f"{t.shape[dim]} must be divisible by {parts}"
            )
        slices = t.chunk(parts, dim)
        return torch.cat([slices[rank], slices[parts - 1 - rank]], dim)
    bounds = cu_seqlens_padded.tolist()
    uneven = any((b - a) % parts or b < a for a, b in pairwise(bounds))
    if bounds[0] != 0 or bounds[-1] != t.shape[dim] or uneven:
        raise ValueError(
            f"cu_seqlens_padded must start at 0 and end at t.shape[{dim}] = {t.shape[dim]} with every "
            f"padded length divisible by 2W = {parts}, got {bounds}"
        )
    pieces = []
    for start, end in pairwise(bounds):
        size = (end - start) // parts
        for k in slice_indices("zigzag", rank, world_size):
            pieces.append(t.narrow(dim, start + k * size, size))
    return torch.cat(pieces, dim) if pieces else t.narrow(dim, 0, 0)


# --- a rank's tokens as the local kernels see them ------------------------------------------------


@dataclass
class Pieces:
    """This rank's tokens in the local kernels' layout: `num_segments` sequences (padded rows or
    varlen segments), each one slice of one global sequence or padding whose results are dropped.

    x / mask / scores: the kernel inputs, (P, S, ...) padded or (T_r, ...) varlen, views of the
    caller's tensors where possible (the autograd graph maps their gradients back).
    """

    x: Tensor | None  # None once without_inputs()
    mask: Tensor | None
    scores: Tensor | None
    cu_seqlens: Tensor | None  # (P + 1,) local segments (varlen)
    segment_seq: Tensor  # (P,) int64: the global sequence of each segment, -1 for padding
    segment_slice: Tensor  # (P,) int64: the position-order index of the slice it holds, -1 for padding
    piece_segment: Tensor  # (slots, B) int64: the segment holding this rank's slot s of sequence b

    def per_segment(self, per_seq: Tensor) -> Tensor:
        """(B, ...) -> (P, ...): each segment gets its sequence's value, 0 for padding segments."""
        real = self.segment_seq >= 0
        picked = (
            per_seq[self.segment_seq.clamp(min=0)]
            if per_seq.shape[0]
            else per_seq.new_zeros(self.segment_seq.shape[0], *per_seq.shape[1:])
        )
        return torch.where(real.view(-1, *([1] * (per_seq.dim() - 1))), picked, 0)

    def per_piece(self, per_segment: Tensor) -> Tensor:
        """(P, ...) -> (slots, B, ...): the states of this rank's slices of every sequence."""
        return per_segment[self.piece_segment]

    def without_inputs(self) -> Pieces:
        """The segment bookkeeping alone, for backward: the inputs it needs are saved by autograd,
        and holding x here would keep the local hidden states alive for ops that save none."""
        return replace(self, x=None, mask=None, scores=None)


def _one_slice_per_sequence(batch: int, slice_index: int, device) -> tuple[Tensor, Tensor, Tensor]:
    sequences = torch.arange(batch, device=device)
    return sequences, torch.full_like(sequences, slice_index), sequences[None]


def contiguous_pieces(x, mask, scores, cu_seqlens, rank: int, token_offset: int) -> Pieces:
    """contiguous: padded x (B, L_r, H) is already one piece per sequence; varlen x (T_r, H) holds
    tokens [offset, offset + T_r) of the packed axis, so clamp(cu_seqlens - offset, 0, T_r) are its
    local segments (one per sequence, maybe empty), computed on the device."""
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    local_cu = None
    if cu_seqlens is not None:
        local_cu = (cu_seqlens.long() - token_offset).clamp(0, x.shape[0]).to(cu_seqlens.dtype)
    return Pieces(x, mask, scores, local_cu, *_one_slice_per_sequence(batch, rank, x.device))


def zigzag_padded_pieces(x, mask, scores, rank: int, world_size: int) -> Pieces:
    """zigzag, padded: x (B, 2S, H) holds slices r and 2W-1-r of each sequence, viewed as 2B
    sequences of S tokens (a copy only if x's batch stride does not allow the view)."""
    batch, length = x.shape[:2]
    half = length // 2
    x = x.reshape(2 * batch, half, *x.shape[2:])
    mask = None if mask is None else mask.reshape(2 * batch, half)
    scores = None if scores is None else scores.reshape(2 * batch, half, *scores.shape[2:])
    sequences = torch.arange(batch, device=x.device)
    slices = torch.tensor(slice_indices("zigzag", rank, world_size), device=x.device)
    return Pieces(
        x,
        mask,
        scores,
        None,
        sequences.repeat_interleave(2),
        slices.repeat(batch),
        torch.stack([2 * sequences, 2 * sequences + 1]),
    )


def zigzag_varlen_pieces(
    x, mask, scores, cu_seqlens, cu_seqlens_padded, rank: int, world_size: int, token_mask: bool
) -> Pieces:
    """zigzag, varlen: for sequence b (padded length P_b, real length n_b, slice size S_b = P_b / 2W)
    the rank holds S_b tokens of slice k for each of its k, of which the first
    clamp(n_b - k S_b, 0, S_b) are real. With `token_mask`, one segment per slice and a (T_r,) mask
    that drops the padding (combined with masked_mean's weights): padding is never read; every
    kernel takes it. Without (first / last token, which look up positions and gather rows), two
    segments per slice, real and padding; the padding segments are never gathered."""
    device = x.device
    padded = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).long()
    real = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    size = padded // (2 * world_size)  # (B,) S_b
    slices = torch.tensor(slice_indices("zigzag", rank, world_size), device=device)  # (2,)
    real_in_slice = (real[:, None] - slices[None, :] * size[:, None]).clamp(min=0)
    real_in_slice = torch.minimum(real_in_slice, size[:, None])  # (B, 2)
    batch = size.shape[0]
    sequences = torch.arange(batch, device=device)
    if token_mask:
        lengths = size[:, None].expand(batch, 2).reshape(-1)  # (2B,) one segment per slice
        local_cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        segment = torch.repeat_interleave(
            torch.arange(2 * batch, device=device), lengths, output_size=x.shape[0]
        )
        position = torch.arange(x.shape[0], device=device) - local_cu[segment]
        is_real = position < real_in_slice.reshape(-1)[segment]
        mask = is_real if mask is None else torch.where(is_real, mask, 0)
        segment_seq, segment_slice = sequences.repeat_interleave(2), slices.repeat(batch)
        piece_segment = torch.stack([2 * sequences, 2 * sequences + 1])
    else:
        padding = size[:, None] - real_in_slice
        lengths = torch.stack([real_in_slice, padding], -1).reshape(-1)  # (4B,) real, padding, real, padding
        local_cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        is_real_segment = torch.tensor([True, False, True, False], device=device).repeat(batch)
        segment_seq = torch.where(is_real_segment, sequences.repeat_interleave(4), -1)
        segment_slice = torch.where(is_real_segment, slices.repeat_interleave(2).repeat(batch), -1)
        piece_segment = torch.stack([4 * sequences, 4 * sequences + 2])
    return Pieces(x, mask, scores, local_cu.to(cu_seqlens.dtype), segment_seq, segment_slice, piece_segment)
