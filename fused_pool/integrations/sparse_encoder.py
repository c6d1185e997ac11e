"""sentence-transformers' SparseEncoder (SPLADE) on fused_pool.linear_pool: the swap behind
fused_pool.integrations.sentence_transformers.patch for a masked language model followed by
SpladePooling, in which the (B, L, vocab) logits are never built.

`fuse_splade(model, backend)` finds, in every nn.Sequential of the model (the model itself and each
Router route), a `Transformer` with transformer_task="fill-mask" (the legacy MLMTransformer too)
followed by a `SpladePooling`, and changes the classes of those two objects in place:
- the Transformer runs the masked LM's base model only: features["token_embeddings"] is its last
  hidden state (B, L, H) (flattened: (1, T, H)), not the (B, L, vocab) MLM logits;
- the SpladePooling runs the MLM head's per-token transform (dense + activation + LayerNorm) and
  fuses the decoder (weight tied to the input embeddings, + its bias) with the activation and the
  pooling (fused_pool.nn.SpladeHead's computation), on the model's own parameters.
Both pooling strategies ("max", "sum") and both activation functions ("relu": log(1 + relu z),
"log1p_relu": log(1 + log(1 + relu z))) are read from the SpladePooling at each call; a padded batch
(attention_mask) or a flattened one (cu_seq_lens_q, max_length_q) as the stock module takes it.
sentence_embedding is what the stock modules give (float32 within 1e-5), and so are its gradients.

The fused classes are subclasses of the stock ones that present the stock names (__module__,
__qualname__), so isinstance checks, state_dict keys, `model.save()` (modules.json, configs, weights)
are those of the unpatched model, which loads without fused_pool; pickling goes through this module.
The supported masked LMs are fused_pool.nn.SpladeHead's (BERT, DistilBERT, RoBERTa, XLM-R, CamemBERT,
ModernBERT) on the "torch" runtime; any other pair is left as it is, with a warning.

Deviations from the stock SpladePooling: `chunk_size` is ignored (nothing of (B, L, vocab) is built);
a non-binary attention mask keeps the tokens where it is nonzero (the stock module multiplies the
logits by it); an empty flattened sequence pools to 0 (the stock module raises); token_embeddings
holds hidden states, not logits.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sparse_encoder.modules import SpladePooling
from torch import Tensor, nn

from ..nn.linear import autocast_linear_pool, masked_lm_head

__all__ = ["fuse_splade"]

# SpladePooling's activation_function -> linear_pool's activation (the stock module applies log1p
# after its activation function).
_ACTIVATIONS = {"relu": "log1p_relu", "log1p_relu": "log1p_log1p_relu"}

try:  # the Transformer's filter of feature keys that are not model inputs (sentence-transformers 6)
    from sentence_transformers.base.modules.transformer import _NON_MODEL_FEATURE_KEYS
except ImportError:  # pragma: no cover - another sentence-transformers version
    _NON_MODEL_FEATURE_KEYS = frozenset({"modality", "prompt_length", "task"})


def _reduce_ex(self, protocol):
    """Pickles as (the stock class, the methods' class), made again on loading by _new_fused."""
    _, _, *state = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (cls,), state...)
    return (_new_fused, _STOCK[type(self)], *state)


class _FusedMaskedLMTransformer:
    """Transformer.forward with the base model in place of the masked LM: token_embeddings are the
    last hidden states, for the fused SpladePooling that follows. (Methods only: see _fused_class.)"""

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        arguments = {**features, **kwargs, "return_dict": True}
        forward_params = getattr(self, "model_forward_params", None)
        if forward_params is None:  # the model's forward takes **kwargs (as the stock one)
            declared = getattr(self, "_declared_forward_params", set())
            call = {k: v for k, v in arguments.items() if k not in _NON_MODEL_FEATURE_KEYS or k in declared}
        else:
            call = {k: v for k, v in arguments.items() if k in forward_params}
        call.pop("labels", None)
        outputs = self.model.base_model(**call)
        features[self.module_output_name] = outputs[0]
        if getattr(self.model.config, "output_hidden_states", False) and "hidden_states" in outputs:
            features["all_layer_embeddings"] = outputs["hidden_states"]
        return features


class _FusedSpladePooling:
    """SpladePooling on the hidden states: the MLM head's transform, then linear_pool with its decoder.
    (Methods only: see _fused_class.)"""

    def forward(self, features: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        transform, decoder = self._masked_lm_head()
        hidden = transform(features["token_embeddings"])
        options = dict(
            mode=self.pooling_strategy,
            activation=_ACTIVATIONS[self.activation_function],
            backend=getattr(self, "backend", None),
        )
        if "cu_seq_lens_q" in features:
            max_seqlen = features.get("max_length_q")
            max_seqlen = (
                max_seqlen if isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) else None
            )
            tokens = hidden.reshape(-1, hidden.shape[-1])  # (1, T, H) -> (T, H)
            pooled = autocast_linear_pool(
                tokens,
                decoder.weight,
                decoder.bias,
                cu_seqlens=features["cu_seq_lens_q"],
                max_seqlen=max_seqlen,
                **options,
            )
        else:
            keep = features["attention_mask"] != 0
            pooled = autocast_linear_pool(hidden, decoder.weight, decoder.bias, keep, **options)
        if self.embedding_dimension is None:
            self.embedding_dimension = pooled.shape[1]
        features["sentence_embedding"] = pooled
        return features

    def _masked_lm_head(self) -> tuple[nn.Module, nn.Linear]:
        """(transform, decoder) of the preceding Transformer's masked LM, found again when the model's
        decoder module was replaced (e.g. by resize_token_embeddings)."""
        model = self.__dict__["_fused_transformer"].model
        head = self.__dict__.get("_fused_head")
        if head is None or head[1] is not model.get_output_embeddings():
            head = self.__dict__["_fused_head"] = masked_lm_head(model)
        return head


_FUSED: dict[tuple[type, type], type] = {}  # (stock class, methods) -> fused class
_STOCK: dict[type, tuple[type, type]] = {}  # the other way round


def _fused_class(stock: type, methods: type) -> type:
    """The subclass of `stock` with the functions of `methods` (a plain class) overriding its own,
    named as `stock` (so sentence-transformers records the stock class in modules.json), made once.
    Its only base is `stock`: the instance layout stays the stock one, so __class__ can be swapped."""
    fused = _FUSED.get((stock, methods))
    if fused is None:
        namespace = {k: v for k, v in vars(methods).items() if isinstance(v, types.FunctionType)}
        namespace.update(
            __module__=stock.__module__,
            __qualname__=stock.__qualname__,
            __doc__=stock.__doc__,
            __reduce_ex__=_reduce_ex,
        )
        fused = types.new_class(stock.__name__, (stock,), exec_body=lambda ns: ns.update(namespace))
        _FUSED[stock, methods] = fused
        _STOCK[fused] = (stock, methods)
    return fused


def _stock_class(module: nn.Module) -> type:
    return _STOCK.get(type(module), (type(module),))[0]


def _is_fused(module: nn.Module) -> bool:
    return type(module) in _STOCK


def _new_fused(stock: type, methods: type):
    cls = _fused_class(stock, methods)
    return cls.__new__(cls)


def _why_not_fusable(transformer: nn.Module) -> str | None:
    """None where the Transformer's masked LM can be fused with a following SpladePooling."""
    if getattr(transformer, "backend", "torch") != "torch":
        return f"its runtime is {transformer.backend!r}, not 'torch'"
    for modality, call in transformer.modality_config.items():
        output = call.get("method_output_name")
        if call.get("method") != "forward" or output not in ("logits", ("logits",), ["logits"]):
            return f"its {modality!r} modality does not call forward for logits ({call})"
    try:
        masked_lm_head(transformer.model)
    except TypeError as error:
        return str(error)
    return None


def fuse_splade(model: nn.Module, backend: str | None = None) -> None:
    """Fuses every fill-mask Transformer + SpladePooling pair of the model, in place (module docstring)."""
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for transformer, pooling in zip(children, children[1:], strict=False):  # neighbours
            if not isinstance(pooling, SpladePooling) or _is_fused(pooling):
                continue
            if not isinstance(transformer, Transformer) or transformer.transformer_task != "fill-mask":
                continue
            reason = _why_not_fusable(transformer)
            if reason is not None:
                warnings.warn(f"SpladePooling left unfused: {reason}", UserWarning, stacklevel=3)
                continue
            transformer.__class__ = _fused_class(_stock_class(transformer), _FusedMaskedLMTransformer)
            pooling.__class__ = _fused_class(_stock_class(pooling), _FusedSpladePooling)
            pooling.backend = backend
            pooling.__dict__["_fused_transformer"] = transformer  # not a submodule: state_dict unchanged
