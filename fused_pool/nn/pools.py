"""Pooling modules over one hidden-states tensor. Every module's forward is

    forward(hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> (B, H_out)

with hidden_states (B, L, H) and an optional (B, L) mask, or varlen (T, H) / (1, T, H) with
cu_seqlens (B + 1,); see fused_pool.functional for the semantics. `backend=None` lets each call
pick its backend (fused_pool.backends).

Every module also says what it needs and gives: `takes_layers` (True: hidden_states is the sequence
of layer outputs, output_hidden_states, not one tensor) and `output_size(hidden_size)`, its output
width on a model of that hidden size (ValueError if it was built for another one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_backend_name, check_count, check_heads, check_pool_inputs
from ..padding import segment_bounds
from ..tokens import first_token, last_token

__all__ = [
    "AttentionPool",
    "CLSPool",
    "DensePooler",
    "LastTokenPool",
    "MaxPool",
    "MeanMaxPool",
    "MeanPool",
    "WeightedMeanPool",
    "position_weights",
]


def position_weights(
    hidden_states: Tensor, attention_mask: Tensor | None, cu_seqlens: Tensor | None, offset: int = 0
) -> Tensor:
    """float32 weights 1, 2, ..., n over each sequence's tokens, counted from its first kept token
    (sentence-transformers' "weightedmean"), plus `offset`: (B, L), 0 where the mask drops a token,
    or varlen (T,). No host sync."""
    if cu_seqlens is not None:
        num_tokens = hidden_states.shape[-2]
        token_ids = torch.arange(num_tokens, device=hidden_states.device)
        if cu_seqlens.shape[0] < 2:  # no sequence: nothing is pooled
            return torch.zeros(num_tokens, dtype=torch.float32, device=hidden_states.device)
        starts, ends = segment_bounds(cu_seqlens, num_tokens)
        sequence = torch.searchsorted(ends, token_ids, right=True).clamp(max=len(ends) - 1)
        return (token_ids - starts[sequence] + 1 + offset).to(torch.float32)
    batch, length = hidden_states.shape[:2]
    positions = torch.arange(
        1 + offset, length + 1 + offset, device=hidden_states.device, dtype=torch.float32
    )
    if attention_mask is None or length == 0:
        return positions.expand(batch, length)
    kept = attention_mask != 0
    first_kept = kept.int().argmax(dim=1, keepdim=True)  # left-padding length (0 for right padding)
    return kept * (positions - first_kept)


class _Pool(nn.Module):
    """A pooling with no parameters. `linear` means pool(sum w_i x_i) = sum w_i pool(x_i)."""

    linear = False
    takes_layers = False
    width = 1  # output size / hidden size

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = check_backend_name(backend)

    def output_size(self, hidden_size: int) -> int:
        return self.width * hidden_size

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

    width = 2

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return F.masked_mean_max(
            hidden_states, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend
        )


class WeightedMeanPool(_Pool):
    """Position-weighted mean (sentence-transformers' "weightedmean"): token i of a sequence, counted
    from its first kept token, gets weight i (1, 2, ..., n) -> (B, H). The mask keeps tokens where it
    is nonzero; varlen inputs take no mask (ValueError) and pass the weights (T,) to the fused
    kernel: no (T, H) temporary."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        check_pool_inputs(hidden_states, attention_mask, cu_seqlens, max_seqlen)  # before the weights
        weights = position_weights(hidden_states, attention_mask, cu_seqlens)
        return F.masked_mean(
            hidden_states, weights, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend
        )


class CLSPool(_Pool):
    """The first kept token of each sequence (the [CLS] position under right or left padding) -> (B, H)."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return first_token(hidden_states, attention_mask, cu_seqlens=cu_seqlens)


class LastTokenPool(_Pool):
    """The last kept token of each sequence (decoder embeddings; left or right padding) -> (B, H)."""

    linear = True

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        return last_token(hidden_states, attention_mask, cu_seqlens=cu_seqlens)


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
        hidden_size, num_heads = check_heads(hidden_size, num_heads)
        mlp_hidden = check_count("mlp_hidden", mlp_hidden)
        if scorer not in ("query", "mlp"):
            raise ValueError(f"scorer must be 'query' or 'mlp', got {scorer!r}")
        self.hidden_size, self.num_heads, self.scorer_kind = hidden_size, num_heads, scorer
        self.mlp_hidden, self.backend = mlp_hidden, check_backend_name(backend)
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

    takes_layers = False

    def output_size(self, hidden_size: int) -> int:
        _require_hidden_size(self, hidden_size)
        return hidden_size

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, scorer={self.scorer_kind!r}"


_ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


class DensePooler(nn.Module):
    """activation(dense(base(hidden_states))) -> (B, H): BERT's pooler (dense + tanh on [CLS]) on any
    model, on top of any base pooling.

    `dense` is nn.Linear(base width, hidden_size), named as in BERT's pooler: with a (B, H) base
    (CLSPool, MeanPool, ...) it is Linear(H, H), so a BERT checkpoint's `pooler.dense` weights load
    into it; a wider base such as MeanMaxPool (B, 2H) gets Linear(2H, H). The base width is
    `base.output_size(hidden_size)` (hidden_size for a module without output_size). activation:
    "tanh" (BERT), "gelu", "relu", "silu", "identity", or an nn.Module. base defaults to CLSPool().
    """

    def __init__(self, hidden_size: int, activation: str | nn.Module = "tanh", base: nn.Module | None = None):
        super().__init__()
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {sorted(_ACTIVATIONS)} or an nn.Module, got {activation!r}"
                )
            self.activation_name, act = activation, _ACTIVATIONS[activation]()
        elif isinstance(activation, nn.Module):
            self.activation_name, act = None, activation
        else:
            raise TypeError(f"activation must be a str or an nn.Module, got {type(activation).__name__}")
        self.hidden_size = check_count("hidden_size", hidden_size)
        self.base = base if base is not None else CLSPool()
        base_size = hidden_size
        if getattr(self.base, "output_size", None) is not None:
            base_size = base_output_size(self.base, hidden_size)  # raises if built for another size
        self.dense = nn.Linear(base_size, hidden_size)
        self.activation = act

    @property
    def takes_layers(self) -> bool:
        return getattr(self.base, "takes_layers", False)

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        pooled = self.base(hidden_states, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.activation(self.dense(pooled))

    def output_size(self, hidden_size: int) -> int:
        _require_hidden_size(self, hidden_size)
        base_size = base_output_size(self.base, hidden_size)
        if base_size != self.dense.in_features:
            raise ValueError(
                f"DensePooler's base {type(self.base).__name__} gives {base_size} features per sequence, "
                f"but dense takes {self.dense.in_features}"
            )
        return hidden_size

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


def base_output_size(module: nn.Module, hidden_size: int) -> int:
    """A pooling module's output width on a model of hidden size `hidden_size`."""
    output_size = getattr(module, "output_size", None)
    if output_size is None:
        raise TypeError(
            f"{type(module).__name__} has no output_size(hidden_size) method, so its output width is "
            "unknown; give it one (fused_pool.nn modules have it)"
        )
    return output_size(hidden_size)


def _require_hidden_size(module: nn.Module, hidden_size: int) -> None:
    if module.hidden_size != hidden_size:
        raise ValueError(
            f"{type(module).__name__} was built for hidden_size = {module.hidden_size}, "
            f"but the hidden states have {hidden_size} channels"
        )
