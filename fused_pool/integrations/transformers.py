"""Hugging Face transformers: a pooled output and a sequence-classification head for any model.

    from fused_pool.integrations.transformers import PooledModel, PooledModelForSequenceClassification

    model = PooledModel(AutoModel.from_pretrained("google/electra-base-discriminator"), pooling="mean")
    model(**batch).pooler_output  # (B, H), also on models that have no pooler_output

    clf = PooledModelForSequenceClassification.from_pretrained(
        "microsoft/deberta-v3-base", pooling="attention", num_labels=3
    )
    clf(**batch, labels=labels).loss  # HF's loss rules; save_pretrained, from_pretrained, Trainer

`pooling` is a mode name (POOLING_MODES: cls, mean, max, mean_max, last, weightedmean, attention,
weighted_layer, concat_layers, lstm, dense; with `pooling_kwargs` for its constructor) or a
fused_pool.nn module. Poolers over layers (weighted_layer, concat_layers, lstm) turn on
output_hidden_states.

Packed batches (padding-free, HF's DataCollatorWithFlattening: input_ids (1, T), position_ids,
optionally cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k / seq_idx, no attention
mask): the attention keyword arguments go to the backbone, each packed sequence is pooled by the
varlen kernels, and the result has one row per sequence. The sequence bounds come from cu_seq_lens_q,
else from position_ids (a sequence starts where the position does not follow the previous one, so
position_ids_start != 0 works); that count reads back to the host unless it is known from the labels
(one per sequence). Keeping the packed sequences apart inside the backbone is the attention's job:
flash_attention_2/3/4 do it from cu_seq_lens_q; decoders under sdpa / eager do it from position_ids
(with no KV cache: the backbone runs with use_cache=False); encoders under sdpa / eager do not (their
bidirectional mask ignores both), so there a packed batch attends across sequences.
`DataCollatorWithFlatteningForSequenceClassification` packs a classification batch (HF's collator
turns labels into token labels).

Importing this module registers PooledModelConfig ("fused_pool") with AutoConfig and
AutoModelForSequenceClassification, so Auto classes load saved models while fused_pool is imported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
    PreTrainedModel,
)
from transformers import PretrainedConfig as _Config
from transformers.modeling_outputs import SequenceClassifierOutput

from .._checks import shape_str
from ._pooling_config import POOLING_MODES, canonical_mode, make_pooler, module_spec, pooler_output_size
from ._transformers_forward import resolve_flag, run_and_pool, with_pooler_output

__all__ = [
    "POOLING_MODES",
    "DataCollatorWithFlatteningForSequenceClassification",
    "PooledModel",
    "PooledModelConfig",
    "PooledModelForSequenceClassification",
    "sequence_classification_loss",
]


class PooledModel(nn.Module):
    """Any Hugging Face model with fused pooling: forward takes the model's inputs and returns its
    output with `pooler_output` (B, H_out) set (BaseModelOutputWithPooling where the model's output
    has no such field). Attributes: `backbone` (the model) and `pooler`.

    pooling: a mode name (POOLING_MODES) with `pooling_kwargs`, or a fused_pool.nn module. Packed
    batches (the module docstring) give one pooled row per sequence.
    """

    def __init__(
        self, model: nn.Module, pooling: str | nn.Module = "mean", pooling_kwargs: dict | None = None
    ) -> None:
        super().__init__()
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a Hugging Face model (with a config), got {type(model).__name__}")
        self.backbone = model
        self.pooler = make_pooler(pooling, pooling_kwargs, model.config)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
        cu_seq_lens_k: Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        packing = dict(
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            seq_idx=seq_idx,
        )
        want_hidden = resolve_flag(output_hidden_states, self.config, "output_hidden_states")
        outputs, pooled = run_and_pool(self.backbone, self.pooler, inputs, packing, want_hidden)
        outputs = with_pooler_output(outputs, pooled, want_hidden)
        return outputs if resolve_flag(return_dict, self.config, "return_dict", True) else outputs.to_tuple()


# --- the classification model --------------------------------------------------------------------


class PooledModelConfig(_Config):
    """Config of PooledModelForSequenceClassification: the backbone's config (`text_config`) plus
    the pooling settings. `pooling` is a mode name (with `pooling_kwargs`) or the spec of a
    fused_pool.nn module ({"module": class name, arguments...}); num_labels, problem_type, id2label
    are the usual HF classification fields."""

    model_type = "fused_pool"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: _Config | dict | None = None,
        pooling: str | dict = "mean",
        pooling_kwargs: dict | None = None,
        classifier_dropout: float | None = None,
        **kwargs,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"text_config has model_type {model_type!r}, which transformers does not know"
                )
            text_config = CONFIG_MAPPING[model_type](**text_config)
        self.text_config = text_config
        # None: a module that no config can record (save_pretrained then refuses, saying why)
        self.pooling = pooling if pooling is None or isinstance(pooling, dict) else canonical_mode(pooling)
        self.pooling_kwargs = dict(pooling_kwargs or {})
        self.classifier_dropout = classifier_dropout
        backbone_attention = getattr(text_config, "_attn_implementation", None)
        super().__init__(**kwargs)
        # The base class hands its own (unset) attention implementation down to text_config, which
        # is the loaded backbone's own config: keep the backbone's choice, and report it here too.
        if backbone_attention is not None and getattr(text_config, "_attn_implementation", None) is None:
            text_config._attn_implementation = backbone_attention
            if self._attn_implementation is None:
                self._attn_implementation_internal = backbone_attention


class PooledModelForSequenceClassification(PreTrainedModel):
    """backbone -> pooler -> dropout -> classifier (nn.Linear) -> SequenceClassifierOutput.

    Build one from any checkpoint that AutoModel loads:

        PooledModelForSequenceClassification.from_pretrained(
            name_or_path, pooling="mean", num_labels=2, problem_type=None, classifier_dropout=None,
            pooling_kwargs=None, **hf_kwargs)

    (hf_kwargs go to AutoModel.from_pretrained: dtype, attn_implementation, revision, ...), or load
    one saved by save_pretrained the same way. The loss follows HF's rules: num_labels == 1 ->
    MSE; integer labels -> cross-entropy; float (multi-hot) labels -> BCE with logits; or the
    config's problem_type. A packed batch (module docstring) gives one row of logits per sequence
    and takes one label per sequence.
    """

    config_class = PooledModelConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the backbone decides: these let its own choice through
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # Trainer: the loss is a mean over sequences, as HF's classifiers

    def __init__(
        self,
        config: PooledModelConfig,
        backbone: PreTrainedModel | None = None,
        pooler: nn.Module | None = None,
    ) -> None:
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("config.text_config (the backbone's config) is required")
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        self.pooler = (
            pooler if pooler is not None else make_pooler(config.pooling, config.pooling_kwargs, config)
        )
        self.dropout = nn.Dropout(config.classifier_dropout or 0.0)
        self.classifier = nn.Linear(pooler_output_size(self.pooler, config), config.num_labels)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        pooling: str | nn.Module | None = None,
        pooling_kwargs: dict | None = None,
        num_labels: int | None = None,
        problem_type: str | None = None,
        classifier_dropout: float | None = None,
        **kwargs,
    ) -> PooledModelForSequenceClassification:
        """A saved PooledModelForSequenceClassification, or a new one on any AutoModel checkpoint."""
        config = kwargs.pop("config", None)
        if config is None:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config_dict, _ = _Config.get_config_dict(pretrained_model_name_or_path, **hub)
            saved = config_dict.get("model_type") == PooledModelConfig.model_type
        else:
            saved = isinstance(config, PooledModelConfig)
        if saved:
            if pooling is not None or pooling_kwargs:
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a saved PooledModelForSequenceClassification, whose "
                    "pooling is in its config; pooling / pooling_kwargs apply to new models only"
                )
            overrides = dict(
                num_labels=num_labels, problem_type=problem_type, classifier_dropout=classifier_dropout
            )
            if config is not None:
                for key, value in overrides.items():
                    if value is not None:
                        setattr(config, key, value)
                kwargs["config"] = config
            else:
                kwargs.update({k: v for k, v in overrides.items() if v is not None})
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if config is not None:
            kwargs["config"] = config
        backbone = AutoModel.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return cls.from_backbone(
            backbone,
            pooling="mean" if pooling is None else pooling,
            pooling_kwargs=pooling_kwargs,
            num_labels=2 if num_labels is None else num_labels,
            problem_type=problem_type,
            classifier_dropout=classifier_dropout,
        )

    @classmethod
    def from_backbone(
        cls,
        backbone: PreTrainedModel,
        pooling: str | nn.Module = "mean",
        pooling_kwargs: dict | None = None,
        num_labels: int = 2,
        problem_type: str | None = None,
        classifier_dropout: float | None = None,
    ) -> PooledModelForSequenceClassification:
        """A new classifier on a loaded base model (its weights are kept; the head is initialized)."""
        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(f"backbone must be a transformers PreTrainedModel, got {type(backbone).__name__}")
        pooler = make_pooler(pooling, pooling_kwargs, backbone.config)
        if classifier_dropout is None:
            classifier_dropout = _default_dropout(backbone.config)
        config = PooledModelConfig(
            text_config=backbone.config,
            **_recorded_pooling(pooling, pooling_kwargs, pooler),
            classifier_dropout=classifier_dropout,
            num_labels=num_labels,
            problem_type=problem_type,
        )
        _mark_initialized(backbone)
        model = cls(config, backbone=backbone, pooler=pooler)
        model.pooler.to(device=backbone.device, dtype=backbone.dtype)
        model.classifier.to(device=backbone.device, dtype=backbone.dtype)
        model.train(backbone.training)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.config.pooling is None:
            module_spec(self.pooler)  # raises: this pooler cannot be recorded in a config
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seq_lens_q: Tensor | None = None,
        cu_seq_lens_k: Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        kwargs.pop("num_items_in_batch", None)  # Trainer's; the loss is a mean over sequences
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        packing = dict(
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            seq_idx=seq_idx,
        )
        want_hidden = resolve_flag(output_hidden_states, self.config, "output_hidden_states")
        num_sequences = labels.shape[0] if isinstance(labels, Tensor) and labels.dim() >= 1 else None
        outputs, pooled = run_and_pool(
            self.backbone, self.pooler, inputs, packing, want_hidden, num_sequences
        )
        logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(
                logits, labels, self.config.num_labels, self.config.problem_type
            )
        result = SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.get("hidden_states") if want_hidden else None,
            attentions=outputs.get("attentions"),
        )
        return result if resolve_flag(return_dict, self.config, "return_dict", True) else result.to_tuple()


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def _default_dropout(config) -> float:
    """The backbone's own classifier dropout, as its HF classifier would use it."""
    for name in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "hidden_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _recorded_pooling(pooling: str | nn.Module, pooling_kwargs: dict | None, pooler: nn.Module) -> dict:
    """What the config records: the mode name and kwargs when they are plain JSON values, else the
    pooler's module spec, else None (a pooler no config can hold)."""
    if isinstance(pooling, str) and _is_json(pooling_kwargs or {}):
        return dict(pooling=pooling, pooling_kwargs=pooling_kwargs)
    try:
        return dict(pooling=module_spec(pooler), pooling_kwargs=None)
    except ValueError:
        return dict(pooling=None, pooling_kwargs=None)


def _is_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _mark_initialized(backbone: nn.Module) -> None:
    """Marks a loaded backbone's modules as initialized, so that post_init does not re-initialize them."""
    for module in backbone.modules():
        module._is_hf_initialized = True


def sequence_classification_loss(
    logits: Tensor, labels: Tensor, num_labels: int, problem_type: str | None = None
) -> Tensor:
    """HF's sequence-classification loss: problem_type, else num_labels == 1 -> regression (MSE);
    integer labels -> single-label (cross-entropy, ignore_index -100); otherwise multi-label (BCE
    with logits). labels: one per sequence, (B,) or (B, num_labels) for multi-label / regression."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    batch = logits.shape[0]
    labels = labels.to(logits.device)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif not labels.is_floating_point() and labels.dtype != torch.bool:
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "single_label_classification" or (problem_type == "regression" and num_labels == 1):
        if labels.numel() != batch or (labels.dim() > 1 and labels.shape[0] != batch):
            raise ValueError(
                f"labels must hold one label per sequence, (B,) = ({batch},), got {shape_str(labels)}"
            )
    elif tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(
            f"labels must be (B, num_labels) = {shape_str(logits)} for {problem_type}, "
            f"got {shape_str(labels)}"
        )
    if problem_type == "regression":
        return nn.functional.mse_loss(logits.reshape(labels.shape), labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1).long())
    if problem_type == "multi_label_classification":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(
        "problem_type must be 'regression', 'single_label_classification' or 'multi_label_classification', "
        f"got {problem_type!r}"
    )


class DataCollatorWithFlatteningForSequenceClassification(DataCollatorWithFlattening):
    """DataCollatorWithFlattening for sequence classification: packs input_ids into (1, T) with
    position_ids and (by default) cu_seq_lens_q / max_length_q, and keeps one label per sequence
    ("labels" or "label" of each feature) as labels (B,) (or (B, num_labels) for lists)."""

    def __init__(self, *args, return_flash_attn_kwargs: bool = True, **kwargs) -> None:
        super().__init__(*args, return_flash_attn_kwargs=return_flash_attn_kwargs, **kwargs)

    def __call__(self, features, return_tensors=None, separator_id=None):
        key = "labels" if "labels" in features[0] else "label" if "label" in features[0] else None
        labels = [feature[key] for feature in features] if key else None
        stripped = [
            {k: v for k, v in feature.items() if k not in ("labels", "label")} for feature in features
        ]
        batch = super().__call__(stripped, return_tensors=return_tensors, separator_id=separator_id)
        batch.pop("labels", None)  # the token labels HF's collator made from input_ids
        if labels is not None:
            batch["labels"] = torch.as_tensor(
                [label.tolist() if isinstance(label, Tensor) else label for label in labels]
            )
        return batch


AutoConfig.register(PooledModelConfig.model_type, PooledModelConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    PooledModelConfig, PooledModelForSequenceClassification, exist_ok=True
)
