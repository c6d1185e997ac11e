"""Projection, activation and pooling in one fused op (fused_pool.linear_pool): LinearPool, and
SpladeHead, a Hugging Face masked language model's head pooled into a SPLADE vector.

    LinearPool(in_features, out_features, bias=True, mode="max", activation=None)
        forward(x, mask=None, *, cu_seqlens=None, max_seqlen=None) -> (B, out_features):
        pool(activation(x @ weight.T + bias)), never building the (tokens, out_features) projection.
    SpladeHead.from_masked_lm(model, pooling="max", activation="log1p_relu")
        forward(hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> (B, vocab):
        the MLM head's per-token transform, then its vocabulary decoder fused with the pooling:
        pool(log(1 + relu(logits))) without the (tokens, vocab) logits.

Both modules share parameters rather than copy them (LinearPool.from_linear and
SpladeHead.from_masked_lm): they hold the source's own Parameter objects, so training either one
trains both and tied weights stay tied. Copy the source first (copy.deepcopy) for an independent
module. Neither imports transformers: SpladeHead finds a model's head by its class names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_backend_name, check_count, check_linear_mode

__all__ = ["LinearPool", "SpladeHead", "autocast_linear_pool", "masked_lm_head"]


def autocast_linear_pool(
    x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None = None, **options
) -> Tensor:
    """fused_pool.linear_pool(x, weight, bias, mask, **options) with x, weight and bias in autocast's
    dtype where autocast is on for x's device (as F.linear runs there: mixed-precision training of a
    float32 model), else as they are."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return F.linear_pool(x, weight, bias, mask, **options)


def _require_linear(name: str, module: object) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(module).__name__}")


class LinearPool(nn.Module):
    """pool(activation(x @ weight.T + bias)) over each sequence's kept tokens -> (B, out_features),
    fused (fused_pool.linear_pool: no (tokens, out_features) tensor, forward or backward).

    `weight` (out_features, in_features) and `bias` (out_features,) are named, shaped and initialized
    as nn.Linear's, so a Linear's state_dict loads. mode: "max", "sum" or "mean"; activation: None,
    "relu", "log1p_relu", "log1p_log1p_relu", "gelu", "tanh" or "silu".
    """

    takes_layers = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "max",
        activation: str | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_count("in_features", in_features)
        self.out_features = check_count("out_features", out_features)
        check_linear_mode("mode", mode, activation)
        self.mode, self.activation, self.backend = mode, activation, check_backend_name(backend)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str = "max", activation: str | None = None, backend: str | None = None
    ) -> LinearPool:
        """A LinearPool on `linear`'s own weight and bias Parameters (shared, not copied: training
        either module trains both; pass copy.deepcopy(linear) for an independent one)."""
        _require_linear("linear", linear)
        has_bias = linear.bias is not None
        module = cls(
            linear.in_features, linear.out_features, has_bias, mode, activation, backend, device="meta"
        )
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        return autocast_linear_pool(
            x,
            self.weight,
            self.bias,
            mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            mode=self.mode,
            activation=self.activation,
            backend=self.backend,
        )

    def output_size(self, hidden_size: int) -> int:
        if hidden_size != self.in_features:
            raise ValueError(
                f"LinearPool was built for in_features = {self.in_features}, "
                f"but the hidden states have {hidden_size} channels"
            )
        return self.out_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}, activation={self.activation!r}"
        )


class _DenseActNorm(nn.Module):
    """norm(act(dense(x))): a head's transform held as loose parts (RoBERTa's lm_head, DistilBERT)."""

    def __init__(self, dense: nn.Module, act, norm: nn.Module) -> None:
        super().__init__()
        self.dense, self.norm = dense, norm
        self.act = act  # a module (registered) or a plain function

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


def _bert_transform(model: nn.Module) -> nn.Module:
    return model.cls.predictions.transform  # dense + transform_act_fn + LayerNorm


def _distilbert_transform(model: nn.Module) -> nn.Module:
    return _DenseActNorm(model.vocab_transform, model.activation, model.vocab_layer_norm)


def _roberta_transform(model: nn.Module) -> nn.Module:
    # RobertaLMHead.forward: layer_norm(gelu(dense(x))) with transformers' gelu, the erf form.
    return _DenseActNorm(model.lm_head.dense, torch_F.gelu, model.lm_head.layer_norm)


def _modernbert_transform(model: nn.Module) -> nn.Module:
    return model.head  # ModernBertPredictionHead: norm(act(dense(x)))


# The supported *ForMaskedLM classes (by name, also as a base class) and their per-token transform;
# the decoder is always model.get_output_embeddings(), whose weight is tied to the input embeddings.
_MASKED_LM_TRANSFORMS = {
    "BertForMaskedLM": _bert_transform,
    "DistilBertForMaskedLM": _distilbert_transform,
    "RobertaForMaskedLM": _roberta_transform,
    "XLMRobertaForMaskedLM": _roberta_transform,
    "CamembertForMaskedLM": _roberta_transform,
    "ModernBertForMaskedLM": _modernbert_transform,
}


def masked_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(transform, decoder) of a supported Hugging Face *ForMaskedLM model: its MLM head split into
    the per-token transform (dense + activation + LayerNorm, the model's own modules) and the
    vocabulary decoder (model.get_output_embeddings(), weight (vocab, hidden), bias or None).
    TypeError naming `model` for any other model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Hugging Face *ForMaskedLM model, got {type(model).__name__}")
    family = next((c.__name__ for c in type(model).__mro__ if c.__name__ in _MASKED_LM_TRANSFORMS), None)
    if family is None:
        raise TypeError(
            f"model must be one of the masked language models {sorted(_MASKED_LM_TRANSFORMS)} "
            f"(or a subclass), got {type(model).__name__}"
        )
    decoder = model.get_output_embeddings()
    if not isinstance(decoder, nn.Linear):
        raise TypeError(
            "model's output embeddings (its MLM decoder) must be a torch.nn.Linear, "
            f"got {type(decoder).__name__}"
        )
    return _MASKED_LM_TRANSFORMS[family](model), decoder


class SpladeHead(nn.Module):
    """A masked language model's head pooled over the tokens: `transform` per token (dense +
    activation + LayerNorm), then the vocabulary `decoder` fused with the activation and the pooling
    (fused_pool.linear_pool) -> (B, vocab), without the (tokens, vocab) logits.

    SPLADE: activation "log1p_relu" (log(1 + relu z)), pooling "max" (SPLADE v2 and later) or "sum";
    "log1p_log1p_relu" is the OpenSearch variant. `transform` and `decoder` are held, not copied: the
    head computes with their current parameters (a retied decoder weight is followed).
    """

    takes_layers = False

    def __init__(
        self,
        transform: nn.Module,
        decoder: nn.Linear,
        pooling: str = "max",
        activation: str | None = "log1p_relu",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(transform, nn.Module):
            raise TypeError(f"transform must be a torch.nn.Module, got {type(transform).__name__}")
        _require_linear("decoder", decoder)
        check_linear_mode("pooling", pooling, activation)
        self.transform, self.decoder = transform, decoder
        self.pooling, self.activation, self.backend = pooling, activation, check_backend_name(backend)

    @classmethod
    def from_masked_lm(
        cls,
        model: nn.Module,
        pooling: str = "max",
        activation: str | None = "log1p_relu",
        backend: str | None = None,
    ) -> SpladeHead:
        """The head of a Hugging Face *ForMaskedLM model (BERT, DistilBERT, RoBERTa, XLM-R, CamemBERT,
        ModernBERT) on the model's own parameters; feed it the base model's last hidden state
        (model.base_model(...)[0])."""
        transform, decoder = masked_lm_head(model)
        return cls(transform, decoder, pooling=pooling, activation=activation, backend=backend)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        return autocast_linear_pool(
            self.transform(hidden_states),
            self.decoder.weight,
            self.decoder.bias,
            attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            mode=self.pooling,
            activation=self.activation,
            backend=self.backend,
        )

    def output_size(self, hidden_size: int) -> int:
        if hidden_size != self.decoder.in_features:
            raise ValueError(
                f"SpladeHead's decoder takes {self.decoder.in_features} channels, "
                f"but the hidden states have {hidden_size}"
            )
        return self.decoder.out_features

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, activation={self.activation!r}"
