"""MAPHead: multi-head attention pooling from learned probes (SigLIP / SigLIP2 / AIMv2, big_vision's
MAPHead) with the key and value projections folded out of the attention.

For head h with query q_h (head_dim d) and key / value projections W_k,h, W_v,h (d, H):

    q_h . (W_k,h x_t + b_k,h) = (W_k,h^T q_h) . x_t + const     the constant cancels in the softmax
    sum_t p_t (W_v,h x_t + b_v,h) = W_v,h (sum_t p_t x_t) + b_v,h      the weights p_t sum to 1

so each head is fused_pool.probe_attention_pool of the raw tokens with one H-wide probe W_k,h^T q_h,
followed by H x H work per sequence instead of two (L, H) x (H, H) projections. The folding is done
in every forward from the parameters themselves, so training updates them as usual.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import MAX_PROBES, check_backend_name, check_count, check_heads

__all__ = ["MAPHead"]

_SIGLIP_HEADS = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")
_AIMV2_HEADS = ("Aimv2AttentionPoolingHead",)


class _MLP(nn.Module):
    """fc1 -> GELU (tanh approximation, SigLIP's gelu_pytorch_tanh) -> fc2, named as SiglipMLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, **factory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, **factory)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def _is_head(head: object, names: tuple[str, ...]) -> bool:
    """True if head's class (or a base class) has one of these names: no transformers import."""
    return isinstance(head, nn.Module) and any(cls.__name__ in names for cls in type(head).__mro__)


def _require_probe(name: str, probe: object, hidden_size: int) -> None:
    if not isinstance(probe, nn.Parameter) or probe.dim() != 3 or probe.shape[0] != 1:
        raise ValueError(f"{name} must be a (1, P, H) nn.Parameter, got {type(probe).__name__}")
    if probe.shape[2] != hidden_size:
        raise ValueError(f"{name} must be (1, P, {hidden_size}), got {tuple(probe.shape)}")


def _require_linear(name: str, module: object, hidden_size: int) -> None:
    if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != (
        hidden_size,
        hidden_size,
    ):
        raise ValueError(f"{name} must be nn.Linear({hidden_size}, {hidden_size}), got {module!r}")


class MAPHead(nn.Module):
    """Multi-head attention pooling from learned probes -> (B, H) (num_probes == 1) or (B, P, H).

    MAPHead(hidden_size, num_heads, num_probes=1, mlp_ratio=4.0) builds a new SigLIP-style head:
    P learned probes attend to the tokens (nn.MultiheadAttention's parameters), then
    out + MLP(LayerNorm(out)). MAPHead.from_siglip(head) / MAPHead.from_aimv2(head) take over a
    Hugging Face head: the same parameter objects (shared, not copied: deepcopy the head first to
    keep both) under the same state_dict names, so a checkpoint of the source head loads unchanged.

    forward(hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None): (B, L, H) with
    an optional (B, L) mask (nonzero = kept), or varlen (T, H) / (1, T, H) with cu_seqlens (B + 1,).
    Padding is never read. A sequence with no kept token pools the tokens to 0, so its attention
    output is the value bias b_v, as if it attended to one all-zero token (out_proj(b_v) before the
    MLP block): finite, with zero gradients to the tokens, probes and query / key weights. Hugging
    Face's Siglip2 head instead averages every token, padding included, when its mask drops them all
    (it adds finfo.min to every score); nn.MultiheadAttention's boolean key_padding_mask gives NaN.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_probes: int = 1,
        mlp_ratio: float = 4.0,
        *,
        intermediate_size: int | None = None,
        layer_norm_eps: float = 1e-6,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_size, num_heads = check_heads(hidden_size, num_heads)
        num_probes = check_count("num_probes", num_probes)
        if intermediate_size is None:
            if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
                raise TypeError(f"mlp_ratio must be a float, got {type(mlp_ratio).__name__}")
            if not mlp_ratio > 0 or not math.isfinite(mlp_ratio):
                raise ValueError(f"mlp_ratio must be > 0 and finite, got {mlp_ratio}")
            intermediate_size = max(1, round(hidden_size * mlp_ratio))
        intermediate_size = check_count("intermediate_size", intermediate_size)
        self._set_sizes(hidden_size, num_heads, num_probes, "siglip", backend)
        factory = dict(device=device, dtype=dtype)
        self.probe = nn.Parameter(torch.empty(1, num_probes, hidden_size, **factory))
        nn.init.xavier_uniform_(self.probe)  # as SiglipPreTrainedModel._init_weights
        # Parameter container only (in_proj_weight, in_proj_bias, out_proj): its forward is not called.
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True, **factory)
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        self.mlp = _MLP(hidden_size, intermediate_size, **factory)

    def _set_sizes(self, hidden_size: int, num_heads: int, num_probes: int, layout: str, backend) -> None:
        if num_heads * num_probes > MAX_PROBES:  # one folded probe per (head, probe)
            raise ValueError(
                f"num_heads * num_probes must be <= {MAX_PROBES}, got {num_heads} * {num_probes}"
            )
        self.hidden_size, self.num_heads, self.num_probes = hidden_size, num_heads, num_probes
        self.layout, self.backend = layout, check_backend_name(backend)

    @classmethod
    def from_siglip(cls, head: nn.Module, *, backend: str | None = None) -> MAPHead:
        """Takes over a Hugging Face SiglipMultiheadAttentionPoolingHead or
        Siglip2MultiheadAttentionPoolingHead (its probe, attention, layernorm and mlp modules)."""
        if not _is_head(head, _SIGLIP_HEADS):
            raise TypeError(
                "head must be a SiglipMultiheadAttentionPoolingHead or "
                f"Siglip2MultiheadAttentionPoolingHead, got {type(head).__name__}"
            )
        attention = head.attention
        if not isinstance(attention, nn.MultiheadAttention):
            kind = type(attention).__name__
            raise ValueError(f"head.attention must be an nn.MultiheadAttention, got {kind}")
        if not (attention._qkv_same_embed_dim and attention.batch_first) or attention.in_proj_bias is None:
            raise ValueError(
                "head.attention must be nn.MultiheadAttention(H, num_heads, batch_first=True) with "
                "in_proj_weight and in_proj_bias"
            )
        if attention.bias_k is not None or attention.add_zero_attn or attention.dropout:
            raise ValueError("head.attention must not use add_bias_kv, add_zero_attn or dropout")
        hidden_size = attention.embed_dim
        _require_probe("head.probe", head.probe, hidden_size)
        if not isinstance(head.layernorm, nn.LayerNorm):
            raise ValueError(f"head.layernorm must be an nn.LayerNorm, got {type(head.layernorm).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_sizes(hidden_size, attention.num_heads, head.probe.shape[1], "siglip", backend)
        self.probe, self.attention, self.layernorm, self.mlp = head.probe, attention, head.layernorm, head.mlp
        return self

    @classmethod
    def from_aimv2(cls, head: nn.Module, *, backend: str | None = None) -> MAPHead:
        """Takes over a Hugging Face Aimv2AttentionPoolingHead (cls_token, k_proj, v_proj, output_proj):
        the cls token is the query itself (no query projection), and no LayerNorm / MLP follows."""
        if not _is_head(head, _AIMV2_HEADS):
            raise TypeError(f"head must be an Aimv2AttentionPoolingHead, got {type(head).__name__}")
        hidden_size, num_heads = head.hidden_size, head.num_heads
        if hidden_size % num_heads:
            raise ValueError(f"head.num_heads = {num_heads} must divide head.hidden_size = {hidden_size}")
        _require_probe("head.cls_token", head.cls_token, hidden_size)
        if head.cls_token.shape[1] != 1:
            raise ValueError(f"head.cls_token must be (1, 1, H), got {tuple(head.cls_token.shape)}")
        for name in ("k_proj", "v_proj", "output_proj"):
            _require_linear(f"head.{name}", getattr(head, name), hidden_size)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_sizes(hidden_size, num_heads, 1, "aimv2", backend)
        self.cls_token, self.k_proj, self.v_proj = head.cls_token, head.k_proj, head.v_proj
        self.output_proj = head.output_proj
        return self

    def _projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(queries (P, H) before the scale, W_k (H, H), W_v (H, H), b_v (H,) or None)."""
        if self.layout == "aimv2":
            return self.cls_token[0], self.k_proj.weight, self.v_proj.weight, self.v_proj.bias
        w_q, w_k, w_v = self.attention.in_proj_weight.chunk(3)
        b_q, _, b_v = self.attention.in_proj_bias.chunk(3)
        return nn.functional.linear(self.probe[0], w_q, b_q), w_k, w_v, b_v

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must end in H = {self.hidden_size}, got shape {tuple(hidden_states.shape)}"
            )
        queries, w_k, w_v, b_v = self._projections()
        hidden, heads, probes = self.hidden_size, self.num_heads, self.num_probes
        head_dim = hidden // heads
        # Keys folded into one H-wide probe per (head, probe): W_k,h^T q_h, head-major.
        folded = torch.einsum(
            "phd,hdi->hpi", queries.view(probes, heads, head_dim), w_k.view(heads, head_dim, hidden)
        ).reshape(heads * probes, hidden)
        pooled = F.probe_attention_pool(
            hidden_states,
            folded.to(hidden_states.dtype),
            attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            scale=head_dim**-0.5,
            backend=self.backend,
        )  # (B, heads * probes, H)
        batch = pooled.shape[0]
        # Values: W_v,h applied to each head's pooled tokens, then b_v (the weights sum to 1).
        attended = torch.einsum(
            "bhpi,hdi->bphd", pooled.view(batch, heads, probes, hidden), w_v.view(heads, head_dim, hidden)
        ).reshape(batch, probes, hidden)
        if b_v is not None:
            attended = attended + b_v
        if self.layout == "aimv2":
            out = self.output_proj(attended)
        else:
            out = self.attention.out_proj(attended)
            out = out + self.mlp(self.layernorm(out))
        return out[:, 0] if probes == 1 else out

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_probes={self.num_probes}, "
            f"layout={self.layout!r}"
        )
