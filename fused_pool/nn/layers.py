"""Poolings over several hidden layers (a model's output_hidden_states), on top of a base pooling.

Each takes `hidden_states` as the sequence of layer outputs (embeddings first, as Hugging Face
returns them), each (B, L, H) or varlen (T, H), and never stacks the layers' hidden states into one
tensor (LSTMPool stacks the pooled (B, H) rows, nothing larger).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_count
from .pools import CLSPool, MeanPool, base_output_size

__all__ = ["ConcatLayersPool", "LSTMPool", "WeightedLayerPool"]


def _require_layers(hidden_states: Sequence[Tensor], needed: int, name: str) -> None:
    if isinstance(hidden_states, Tensor) or len(hidden_states) < needed:
        got = "a tensor" if isinstance(hidden_states, Tensor) else f"{len(hidden_states)} layers"
        raise ValueError(
            f"{name} needs a sequence of at least {needed} layer outputs (output_hidden_states), got {got}"
        )


def _check_initial_weights(layer_weights: Tensor) -> None:
    """Finite and not summing to 0: a constructor argument, so reading it costs no sync in training.
    Skipped on the meta device (Hugging Face's from_pretrained builds modules there, then loads)."""
    if layer_weights.device.type == "meta":
        return
    initial = layer_weights.detach().double().cpu()
    if not torch.isfinite(initial).all() or initial.sum() == 0:
        raise ValueError(
            f"layer_weights must be finite and must not sum to 0 (they are normalised by their sum), "
            f"got {initial.tolist()}"
        )


class WeightedLayerPool(nn.Module):
    """Learned weights over layers layer_start..num_layers, then the base pooling -> (B, H_base).

    out = base(sum_i w_i h_i / sum_i w_i). With a linear base (mean, CLS, last token) this is
    computed as sum_i w_i base(h_i) / sum_i w_i: each layer is pooled where it lies, and nothing of
    size (B, L, H) is built. Other bases get the mixed (B, L, H) hidden states.

    num_layers: the model's number of layers (hidden_states then holds num_layers + 1 tensors).
    layer_weights: the initial weights (default: ones), learnable; they must be finite and must not
    sum to 0 (ValueError). Should the learned weights come to sum to exactly 0, the normalised
    weights are 0, as in masked_mean's weighted mean with zero total weight: the layers mix to 0
    (0 with a linear base) and the output is never NaN. Checking the sum at every forward would
    cost a host sync.
    """

    takes_layers = True

    def __init__(
        self,
        num_layers: int,
        layer_start: int = 4,
        base: nn.Module | None = None,
        layer_weights: Tensor | None = None,
    ) -> None:
        super().__init__()
        num_layers = check_count("num_layers", num_layers, minimum=0)
        layer_start = check_count("layer_start", layer_start, minimum=0)
        if not layer_start <= num_layers:
            raise ValueError(f"layer_start = {layer_start} must be in [0, num_layers = {num_layers}]")
        count = num_layers + 1 - layer_start
        if layer_weights is None:
            layer_weights = torch.ones(count)
        if not isinstance(layer_weights, Tensor):
            raise TypeError(
                f"layer_weights must be a torch.Tensor or None, got {type(layer_weights).__name__}"
            )
        if tuple(layer_weights.shape) != (count,):
            got = tuple(layer_weights.shape)
            raise ValueError(
                f"layer_weights must have {count} entries (layers {layer_start}..{num_layers}), got {got}"
            )
        _check_initial_weights(layer_weights)
        self.num_layers, self.layer_start = num_layers, layer_start
        self.base = base if base is not None else MeanPool()
        self.layer_weights = nn.Parameter(layer_weights.clone().float())

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        _require_layers(hidden_states, self.num_layers + 1, type(self).__name__)
        layers = hidden_states[self.layer_start : self.num_layers + 1]
        total = self.layer_weights.sum()
        nonzero = total != 0  # on the device: no host sync
        weights = torch.where(nonzero, self.layer_weights / torch.where(nonzero, total, 1), 0)
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if getattr(self.base, "linear", False):
            pooled = [self.base(layer, attention_mask, **kwargs) for layer in layers]
            out = sum(w * p for w, p in zip(weights, pooled, strict=True))
        else:
            mixed = sum(w * layer for w, layer in zip(weights, layers, strict=True))
            out = self.base(mixed, attention_mask, **kwargs)
        return out.to(layers[0].dtype)

    def output_size(self, hidden_size: int) -> int:
        return base_output_size(self.base, hidden_size)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, layer_start={self.layer_start}"


class ConcatLayersPool(nn.Module):
    """cat(base(h_-1), base(h_-2), ..., base(h_-k)): the base pooling of each of the last k layers,
    last layer first -> (B, k * H_base). (For channel-wise bases such as mean and max this equals
    pooling the concatenated layers, without building them.)"""

    takes_layers = True

    def __init__(self, num_layers: int = 4, base: nn.Module | None = None) -> None:
        super().__init__()
        self.num_layers = check_count("num_layers", num_layers)
        self.base = base if base is not None else MeanPool()

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        _require_layers(hidden_states, self.num_layers, type(self).__name__)
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return torch.cat(
            [self.base(hidden_states[-i], attention_mask, **kwargs) for i in range(1, self.num_layers + 1)],
            -1,
        )

    def output_size(self, hidden_size: int) -> int:
        return self.num_layers * base_output_size(self.base, hidden_size)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"


class LSTMPool(nn.Module):
    """LSTM pooling: each layer from `layer_start` on is pooled by `base` (default CLSPool()), the
    pooled rows run through `self.lstm` (nn.LSTM(hidden_size, lstm_hidden_size, batch_first=True))
    as a sequence over layers, and the LSTM's last output is the result -> (B, lstm_hidden_size).

    The "LSTM pooling" of Kaggle solutions: layer_start=1 skips the embeddings.
    """

    takes_layers = True

    def __init__(
        self, hidden_size: int, lstm_hidden_size: int, layer_start: int = 1, base: nn.Module | None = None
    ) -> None:
        super().__init__()
        hidden_size, lstm_hidden_size = (
            check_count("hidden_size", hidden_size),
            check_count("lstm_hidden_size", lstm_hidden_size),
        )
        layer_start = check_count("layer_start", layer_start, minimum=0)
        self.hidden_size, self.lstm_hidden_size, self.layer_start = hidden_size, lstm_hidden_size, layer_start
        self.base = base if base is not None else CLSPool()
        self.lstm = nn.LSTM(hidden_size, lstm_hidden_size, batch_first=True)

    def forward(self, hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None) -> Tensor:
        _require_layers(hidden_states, self.layer_start + 1, type(self).__name__)
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        pooled = [self.base(layer, attention_mask, **kwargs) for layer in hidden_states[self.layer_start :]]
        sequence = torch.stack(pooled, dim=1)  # (B, layers, H)
        if sequence.shape[-1] != self.hidden_size:
            raise ValueError(
                f"LSTMPool was built for hidden_size = {self.hidden_size}, but its base gives "
                f"{sequence.shape[-1]} features per layer"
            )
        output, _ = self.lstm(sequence.to(self.lstm.weight_ih_l0.dtype))
        return output[:, -1]

    def output_size(self, hidden_size: int) -> int:
        base_size = base_output_size(self.base, hidden_size)
        if base_size != self.hidden_size:
            raise ValueError(
                f"LSTMPool was built for hidden_size = {self.hidden_size}, but its base "
                f"{type(self.base).__name__} gives {base_size} features per layer on hidden size "
                f"{hidden_size}"
            )
        return self.lstm_hidden_size

    def extra_repr(self) -> str:
        return f"layer_start={self.layer_start}"
