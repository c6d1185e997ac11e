"""Pooling modules from names, and back: what a saved model's config records about its pooler.

A pooler is given either as a mode name plus keyword arguments, resolved against the model's hidden
size and layer count (`build_pooler`), or as a fused_pool.nn module, recorded as a JSON-serializable
spec {"module": class name, constructor arguments...} (`module_spec`, `module_from_spec`). Modules
that are not one of fused_pool.nn's (or that carry something a spec cannot hold, such as a custom
activation module) have no spec: `module_spec` raises a ValueError that says so.

Mode names follow sentence-transformers, TEI and vLLM where they overlap ("cls", "mean", "max",
"weightedmean", "last"; "lasttoken", "last-token" and upper case are accepted too).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import nn as fnn
from ..nn.pools import base_output_size

__all__ = [
    "POOLING_MODES",
    "build_pooler",
    "canonical_mode",
    "make_pooler",
    "model_sizes",
    "module_from_spec",
    "module_spec",
    "pooler_output_size",
]

POOLING_MODES = (
    "cls",
    "mean",
    "max",
    "mean_max",
    "last",
    "weightedmean",
    "attention",
    "weighted_layer",
    "concat_layers",
    "lstm",
    "dense",
)
_ALIASES = {"lasttoken": "last", "last_token": "last"}  # sentence-transformers, TEI ("last-token")

# Modes that take no arguments but `backend`, and their modules.
_SIMPLE = {
    "cls": fnn.CLSPool,
    "mean": fnn.MeanPool,
    "max": fnn.MaxPool,
    "mean_max": fnn.MeanMaxPool,
    "last": fnn.LastTokenPool,
    "weightedmean": fnn.WeightedMeanPool,
}


def canonical_mode(name: object) -> str:
    """The canonical mode name for `name` (case and "-" / "_" spelling are free); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(
            f"pooling must be a mode name (str) or a fused_pool.nn module, got {type(name).__name__}"
        )
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in POOLING_MODES:
        raise ValueError(f"pooling = {name!r} is not a pooling mode; expected one of {POOLING_MODES}")
    return key


def _base(base: Any, hidden_size: int, num_layers: int, default: str) -> nn.Module:
    """A base pooling given as a mode name, a spec dict or a module (default: the named mode)."""
    if base is None:
        base = default
    if isinstance(base, nn.Module):
        return base
    if isinstance(base, dict):
        return module_from_spec(base)
    return build_pooler(base, hidden_size, num_layers)


def build_pooler(mode: str, hidden_size: int, num_layers: int, **kwargs: Any) -> nn.Module:
    """The pooling module of `mode` for a model of `hidden_size` channels and `num_layers` layers.

    kwargs go to the module's constructor: `backend` for the simple modes; AttentionPool's
    num_heads / scorer / mlp_hidden; layer_start (weighted_layer: default min(4, num_layers);
    lstm: 1), num_layers (concat_layers: default min(4, num_layers)), lstm_hidden_size (default
    hidden_size), activation (dense: "tanh"); `base` (a mode name) for weighted_layer (default
    "mean"), concat_layers ("mean"), lstm ("cls") and dense ("cls").
    """
    mode = canonical_mode(mode)
    try:
        if mode in _SIMPLE:
            return _SIMPLE[mode](**kwargs)
        if mode == "attention":
            return fnn.AttentionPool(hidden_size, **kwargs)
        if mode == "weighted_layer":
            base = _base(kwargs.pop("base", None), hidden_size, num_layers, "mean")
            kwargs.setdefault("layer_start", min(4, num_layers))
            return fnn.WeightedLayerPool(num_layers, base=base, **kwargs)
        if mode == "concat_layers":
            base = _base(kwargs.pop("base", None), hidden_size, num_layers, "mean")
            kwargs.setdefault("num_layers", min(4, num_layers))
            return fnn.ConcatLayersPool(base=base, **kwargs)
        if mode == "lstm":
            base = _base(kwargs.pop("base", None), hidden_size, num_layers, "cls")
            kwargs.setdefault("lstm_hidden_size", hidden_size)
            return fnn.LSTMPool(hidden_size, base=base, **kwargs)
        base = _base(kwargs.pop("base", None), hidden_size, num_layers, "cls")  # dense
        return fnn.DensePooler(hidden_size, base=base, **kwargs)
    except TypeError as error:  # an unknown keyword argument
        raise TypeError(f"pooling_kwargs {sorted(kwargs)} do not fit pooling = {mode!r}: {error}") from None


# Constructor arguments of each fused_pool.nn module, and the attribute that holds each.
_SPEC_ARGS: dict[str, dict[str, str]] = {
    **{cls.__name__: {"backend": "backend"} for cls in _SIMPLE.values()},
    "AttentionPool": {
        "hidden_size": "hidden_size",
        "num_heads": "num_heads",
        "scorer": "scorer_kind",
        "mlp_hidden": "mlp_hidden",
        "backend": "backend",
    },
    "WeightedLayerPool": {"num_layers": "num_layers", "layer_start": "layer_start", "base": "base"},
    "ConcatLayersPool": {"num_layers": "num_layers", "base": "base"},
    "LSTMPool": {
        "hidden_size": "hidden_size",
        "lstm_hidden_size": "lstm_hidden_size",
        "layer_start": "layer_start",
        "base": "base",
    },
    "DensePooler": {"hidden_size": "hidden_size", "activation": "activation_name", "base": "base"},
}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """A JSON-serializable description of a fused_pool.nn pooling module (its weights are not in it)."""
    name = type(module).__name__
    if name not in _SPEC_ARGS or getattr(fnn, name, None) is not type(module):
        raise ValueError(
            f"the pooler {name} cannot be recorded in a config: only fused_pool.nn's own modules "
            f"({', '.join(sorted(_SPEC_ARGS))}) can; give pooling as a mode name (with pooling_kwargs), "
            "or save the state_dict yourself"
        )
    spec: dict[str, Any] = {"module": name}
    for argument, attribute in _SPEC_ARGS[name].items():
        value = getattr(module, attribute)
        if argument == "base":
            value = module_spec(value)
        elif argument == "activation" and value is None:
            raise ValueError(
                "the pooler DensePooler has a custom activation module, which cannot be recorded in a "
                "config; use one of the named activations"
            )
        spec[argument] = value
    return spec


def module_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The module that `module_spec` described (with freshly initialized weights)."""
    spec = dict(spec)
    name = spec.pop("module", None)
    if name not in _SPEC_ARGS:
        raise ValueError(f"pooling spec names module {name!r}; expected one of {sorted(_SPEC_ARGS)}")
    if "base" in spec:
        spec["base"] = module_from_spec(spec["base"])
    return getattr(fnn, name)(**spec)


# --- the pooler of a given model --------------------------------------------------------------


def model_sizes(config) -> tuple[int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size), int(text.num_hidden_layers)


def make_pooler(pooling: str | nn.Module, pooling_kwargs: dict | None, config) -> nn.Module:
    """The pooler for `config`'s model, from a mode name (+ kwargs), a spec dict or a module; checks
    that it fits the model's hidden size."""
    hidden_size, num_layers = model_sizes(config)
    if isinstance(pooling, nn.Module):
        if pooling_kwargs:
            raise ValueError("pooling_kwargs must be empty when pooling is a module")
        pooler = pooling
    elif isinstance(pooling, dict):
        pooler = module_from_spec(pooling)
    else:
        pooler = build_pooler(pooling, hidden_size, num_layers, **(pooling_kwargs or {}))
    output_size = getattr(pooler, "output_size", None)
    if output_size is not None:
        output_size(hidden_size)  # ValueError if built for another hidden size
    return pooler


def pooler_output_size(pooler: nn.Module, config) -> int:
    """The classifier's input size: the pooler's output width on `config`'s model."""
    return base_output_size(pooler, model_sizes(config)[0])
