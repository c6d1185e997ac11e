"""Padding-free helpers for flash-attention users and Hugging Face's flattening collator.

- `cu_seqlens_from_mask(attention_mask)`: (B + 1,) int32 offsets of the kept tokens; no host sync.
- `cu_seqlens_from_position_ids(position_ids)`: offsets of the sequences of a flattened batch
  (positions restart at 0 for each sequence); a host sync unless `num_sequences` is given.
- `unpad(hidden_states, attention_mask)` -> `Unpadded(hidden_states, indices, cu_seqlens,
  max_seqlen)`, like flash-attn's `unpad_input`; `pad(hidden_states, indices, batch, seqlen)`
  puts packed tokens back, like `pad_input`. `unpad` reads the kept-token count back to the host
  (its output size depends on the mask).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Unpadded",
    "cu_seqlens_from_mask",
    "cu_seqlens_from_position_ids",
    "cu_seqlens_from_starts",
    "pad",
    "segment_bounds",
    "unpad",
]


class Unpadded(NamedTuple):
    hidden_states: Tensor  # (T, ...) the kept tokens, sequence after sequence
    indices: Tensor  # (T,) int64: their positions in the flattened (B * L) input
    cu_seqlens: Tensor  # (B + 1,) int32
    max_seqlen: int  # the longest sequence, as a host int (the kernels' optional hint)


def segment_bounds(cu_seqlens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """[start, end) of each sequence as int64, clamped to [0, num_tokens] like every kernel does."""
    starts = cu_seqlens[:-1].long().clamp(0, num_tokens)
    ends = torch.maximum(cu_seqlens[1:].long(), starts).clamp(max=num_tokens)
    return starts, ends


def _require_mask(attention_mask: Tensor) -> None:
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        shape = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(f"attention_mask must be a (B, L) tensor, got {shape}")


def cu_seqlens_from_mask(attention_mask: Tensor) -> Tensor:
    """(B + 1,) int32: 0, then the running count of kept (nonzero) tokens per sequence."""
    _require_mask(attention_mask)
    counts = (attention_mask != 0).sum(dim=1, dtype=torch.int32)
    return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_position_ids(position_ids: Tensor, num_sequences: int | None = None) -> Tensor:
    """(B + 1,) int32 offsets of a flattened batch whose position ids restart at 0 per sequence
    ((T,) or (1, T), as DataCollatorWithFlattening gives). Finding the starts reads back to the
    host unless `num_sequences` (B) is given."""
    if (
        not isinstance(position_ids, Tensor)
        or position_ids.dim() not in (1, 2)
        or (position_ids.dim() == 2 and position_ids.shape[0] != 1)
    ):
        raise ValueError("position_ids must be (T,) or (1, T)")
    return cu_seqlens_from_starts(position_ids.reshape(-1) == 0, num_sequences)


def cu_seqlens_from_starts(is_start: Tensor, num_sequences: int | None = None) -> Tensor:
    """(B + 1,) int32 offsets from (T,) flags marking each sequence's first token. Reads back to the
    host unless `num_sequences` (B) is given (then missing starts are padded with T)."""
    num_tokens = is_start.shape[0]
    if num_sequences is None:
        starts = is_start.nonzero().reshape(-1)
    else:
        starts = torch.nonzero_static(is_start, size=num_sequences, fill_value=num_tokens).reshape(-1)
    end = torch.full((1,), num_tokens, dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def unpad(hidden_states: Tensor, attention_mask: Tensor) -> Unpadded:
    """(B, L, ...) hidden states and a (B, L) mask -> the kept tokens packed, sequence by sequence."""
    _require_mask(attention_mask)
    if hidden_states.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must agree on (B, L)"
        )
    kept = attention_mask != 0
    counts = kept.sum(dim=1, dtype=torch.int32)
    indices = kept.reshape(-1).nonzero().reshape(-1)
    cu_seqlens = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = int(counts.max()) if counts.numel() else 0
    packed = hidden_states.reshape(-1, *hidden_states.shape[2:]).index_select(0, indices)
    return Unpadded(packed, indices, cu_seqlens, max_seqlen)


def pad(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Packed (T, ...) tokens back to (B, L, ...) at `indices`, zeros elsewhere (differentiable)."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    return out.index_copy(0, indices, hidden_states).reshape(batch, seqlen, *hidden_states.shape[1:])
