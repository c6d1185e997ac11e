"""Running a Hugging Face model and pooling its output, padded or packed (padding-free); the
machinery behind fused_pool.integrations.transformers (see its docstring)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
    ModelOutput,
)

from .._checks import shape_str
from ..padding import cu_seqlens_from_starts

__all__ = ["resolve_flag", "run_and_pool", "with_pooler_output"]


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward) -> tuple[frozenset[str], bool]:
    parameters = inspect.signature(forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return frozenset(parameters), takes_any


def _accepts(backbone: nn.Module, name: str) -> bool:
    names, takes_any = _forward_parameters(type(backbone).forward)
    return takes_any or name in names


def _packed_cu_seqlens(
    position_ids: Tensor, cu_seq_lens_q: Tensor | None, num_sequences: int | None
) -> Tensor:
    """(B + 1,) offsets of a packed batch: cu_seq_lens_q, else where position_ids restart.

    With num_sequences known there is no host sync (a count check runs on CPU tensors only, where
    it is free); otherwise the starts are read back to the host.
    """
    if cu_seq_lens_q is not None:
        if not isinstance(cu_seq_lens_q, Tensor) or cu_seq_lens_q.dim() != 1:
            got = (
                shape_str(cu_seq_lens_q)
                if isinstance(cu_seq_lens_q, Tensor)
                else type(cu_seq_lens_q).__name__
            )
            raise ValueError(f"cu_seq_lens_q must be a (B + 1,) tensor, got {got}")
        return cu_seq_lens_q
    positions = position_ids.reshape(-1)
    is_start = torch.ones_like(positions, dtype=torch.bool)
    is_start[1:] = positions[1:] != positions[:-1] + 1  # a sequence starts where positions do not go on
    if num_sequences is not None and positions.device.type == "cpu" and int(is_start.sum()) != num_sequences:
        raise ValueError(
            f"labels has {num_sequences} rows, but the packed batch holds {int(is_start.sum())} "
            "sequences (from position_ids); a packed batch takes one label per sequence"
        )
    return cu_seqlens_from_starts(is_start, num_sequences)


def run_and_pool(
    backbone: nn.Module,
    pooler: nn.Module,
    inputs: dict[str, Any],
    packing: dict[str, Any],
    output_hidden_states: bool | None,
    num_sequences: int | None = None,
) -> tuple[ModelOutput, Tensor]:
    """Runs the backbone on `inputs` (+ the packing kwargs) and pools its output -> (outputs, pooled).

    A batch is packed when it has cu_seq_lens_q, or position_ids and no attention mask with one row.
    """
    layers = bool(getattr(pooler, "takes_layers", False))
    tokens = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
    attention_mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
    packed = packing.get("cu_seq_lens_q") is not None or (
        attention_mask is None and position_ids is not None and tokens is not None and tokens.shape[0] == 1
    )
    if packed:
        if tokens is not None and tokens.shape[0] != 1:
            name = "input_ids" if inputs.get("input_ids") is not None else "inputs_embeds"
            raise ValueError(
                f"a packed batch (cu_seq_lens_q given) has {name} (1, T), got {shape_str(tokens)}"
            )
        if attention_mask is not None:
            raise ValueError("attention_mask must be None in a packed batch (cu_seq_lens_q given)")
        if position_ids is None:
            raise ValueError(
                "a packed batch needs position_ids (restarting for each sequence), as "
                "DataCollatorWithFlattening gives them"
            )
        if not _accepts(backbone, "position_ids"):
            raise ValueError(
                f"{type(backbone).__name__} takes no position_ids, so it cannot run a packed batch"
            )
    call = {k: v for k, v in inputs.items() if v is not None}
    call.update({k: v for k, v in packing.items() if v is not None and _accepts(backbone, k)})
    if "use_cache" not in call and "use_cache" in _forward_parameters(type(backbone).forward)[0]:
        call["use_cache"] = False  # pooling needs no KV cache (and decoders detect packing only without one)
    if layers or output_hidden_states:
        call["output_hidden_states"] = True
    if _accepts(backbone, "return_dict"):
        call["return_dict"] = True
    outputs = backbone(**call)
    hidden = outputs.hidden_states if layers else outputs[0]
    if layers and hidden is None:
        raise ValueError(f"{type(backbone).__name__} returned no hidden_states, which the pooler needs")
    if not packed:
        return outputs, pooler(hidden, attention_mask)
    cu_seqlens = _packed_cu_seqlens(position_ids, packing.get("cu_seq_lens_q"), num_sequences)
    max_seqlen = packing.get("max_length_q")
    max_seqlen = max_seqlen if isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) else None
    return outputs, pooler(hidden, None, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def with_pooler_output(outputs: ModelOutput, pooled: Tensor, keep_hidden_states: bool) -> ModelOutput:
    """The backbone's output with pooler_output set: its own class when that has the field, else
    the matching BaseModelOutputWithPooling*, else its class extended by a pooler_output field."""
    fields = {f.name for f in dataclasses.fields(outputs)}
    values = {k: v for k, v in outputs.items() if k != "pooler_output"}
    if not keep_hidden_states:
        values.pop("hidden_states", None)
    if "pooler_output" in fields:
        cls = type(outputs)
    elif type(outputs) is BaseModelOutput:
        cls = BaseModelOutputWithPooling
    elif fields <= {f.name for f in dataclasses.fields(BaseModelOutputWithPoolingAndCrossAttentions)}:
        cls = BaseModelOutputWithPoolingAndCrossAttentions
    else:
        cls = _extended_output_class(type(outputs))
    return cls(**values, pooler_output=pooled)


@functools.cache
def _extended_output_class(cls: type) -> type:
    extended = dataclasses.make_dataclass(
        f"{cls.__name__}WithPooling",
        [("pooler_output", torch.FloatTensor | None, dataclasses.field(default=None))],
        bases=(cls,),
    )
    extended.__module__ = __name__
    return extended


def resolve_flag(value, config, name: str, default: bool = False) -> bool:
    if value is not None:
        return bool(value)
    return bool(getattr(config, name, default))
