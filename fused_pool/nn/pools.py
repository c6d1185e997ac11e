"""Pooling modules over one hidden-states tensor. Every module's forward is

    forward(hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> (B, H_out)

with hidden_states (B, L, H) and an optional (B, L) mask, or varlen (T, H) / (1, T, H) with
cu_seqlens (B + 1,); see fused_pool.functional for the semantics. `backend=None` lets each call
pick its backend (fused_pool.backends).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_pool_inputs
from ..padding import segment_bounds

__all__ = ["AttentionPool", "CLSPool", "LastTokenPool", "MaxPool", "MeanMaxPool", "MeanPool", "select_token"]


def select_token(
    hidden_states: Tensor, attention_mask: Tensor | None, cu_seqlens: Tensor | None, which: str
) -> Tensor:
    """(B, H): the first or last kept token of each sequence (left or right padding, varlen);
    0 for a sequence with no kept token. Gathers B rows; no host sync."""
    x = check_pool_inputs(hidden_states, attention_mask, cu_seqlens, None)
    if cu_seqlens is not None:
        starts, ends = segment_bounds(cu_seqlens, x.shape[0])
        position, nonempty = (starts if which == "first" else ends - 1), ends > starts
        rows = (
            x.new_zeros(len(starts), x.shape[1]) if x.shape[0] == 0 else x[position.clamp(0, x.shape[0] - 1)]
        )
        return torch.where(nonempty[:, None], rows, 0)
    batch, length, hidden = x.shape
    if length == 0:
        return x.sum(1) * 0
    if attention_mask is None:
        return x[:, 0 if which == "first" else length - 1]
    kept = attention_mask != 0
    if which == "first":
        position = kept.int().argmax(1)  # argmax returns the first of equal maxima
    else:
        position = length - 1 - kept.flip(1).int().argmax(1)
    rows = x.gather(1, position.view(batch, 1, 1).expand(batch, 1, hidden)).squeeze(1)
    return torch.where(kept.any(1, keepdim=True), rows, 0)


class _Pool(nn.Module):
    """A pooling with no parameters. `linear` means pool(sum w_i x_i) = sum w_i pool(x_i)."""

    linear = False

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend else ""


class MeanPool(_Pool):
    """Mean of the kept tokens (a floating mask weights it) -> (B, H)."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return F.masked_mean(
            hidden_states, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend
        )


class MaxPool(_Pool):
    """Max over the kept tokens -> (B, H)."""

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return F.masked_max(
            hidden_states, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend
        )


class MeanMaxPool(_Pool):
    """cat(mean, max) of the kept tokens, from one read of the hidden states -> (B, 2H)."""

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return F.masked_mean_max(
            hidden_states, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend
        )


class CLSPool(_Pool):
    """The first kept token of each sequence (the [CLS] position under right or left padding) -> (B, H)."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return select_token(hidden_states, attention_mask, cu_seqlens, "first")


class LastTokenPool(_Pool):
    """The last kept token of each sequence (decoder embeddings; left or right padding) -> (B, H)."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return select_token(hidden_states, attention_mask, cu_seqlens, "last")


class AttentionPool(nn.Module):
    """Attention pooling: a scorer gives each kept token a weight per head, softmax over the
    sequence, weighted sum of the head's channels -> (B, H).

    scorer="query": a learned query per head, scores (x_head . query_head) / sqrt(H / nh) computed
    inside the fused kernel (initialized to zeros: training starts from mean pooling).
    scorer="mlp": Linear(H, mlp_hidden) -> Tanh -> Linear(mlp_hidden, nh), the head of many Kaggle
    solutions and blog posts, then the fused masked softmax + weighted sum.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 1,
        scorer: str = "query",
        mlp_hidden: int = 512,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"num_heads = {num_heads} must be >= 1 and divide hidden_size = {hidden_size}")
        if scorer not in ("query", "mlp"):
            raise ValueError(f"scorer must be 'query' or 'mlp', got {scorer!r}")
        self.hidden_size, self.num_heads, self.scorer_kind, self.backend = (
            hidden_size,
            num_heads,
            scorer,
            backend,
        )
        if scorer == "query":
            self.query = nn.Parameter(torch.zeros(num_heads, hidden_size // num_heads))
        else:
            self.scorer = nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, num_heads)
            )

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend)
        if self.scorer_kind == "query":
            return F.query_attention_pool(hidden_states, self.query, attention_mask, **kwargs)
        scores = self.scorer(hidden_states)  # (B, L, nh) / (T, nh)
        if cu_seqlens is not None and scores.dim() == 3:  # (1, T, nh) from a flattening collator
            scores = scores[0]
        return F.attention_pool(hidden_states, scores, attention_mask, **kwargs)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, scorer={self.scorer_kind!r}"
