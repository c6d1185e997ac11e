"""Argument checks shared by every public function: clear errors that name the argument.

Nothing here reads a tensor's values (no host sync); `validate_cu_seqlens` is the helper that does.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from .backends import BACKENDS
from .contract import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on the same device")


def check_pool_inputs(
    x: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    varlen_weights: bool = False,
) -> Tensor:
    """Checks x / mask / cu_seqlens / max_seqlen and returns x as (B, L, H) padded or (T, H) varlen.

    varlen_weights: with cu_seqlens, accept a floating (T,) mask of per-token weights (masked_mean,
    linear_pool);
    otherwise the mask must be None there.
    """
    _require_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"max_seqlen must be a Python int or None, got {type(max_seqlen).__name__}")
    if max_seqlen is not None and max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")

    if cu_seqlens is None:
        if x.dim() != 3:
            raise ValueError(
                f"x must be (B, L, H) when cu_seqlens is None, got shape {shape_str(x)}; "
                "pass cu_seqlens for varlen (T, H) input"
            )
        if mask is not None:
            _require_tensor("mask", mask)
            if mask.dtype.is_complex:
                raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"mask must be (B, L) = ({x.shape[0]}, {x.shape[1]}) to match x {shape_str(x)}, "
                    f"got shape {shape_str(mask)}"
                )
            _require_same_device("mask", mask, x)
        return x

    _require_tensor("cu_seqlens", cu_seqlens)
    if mask is not None and not varlen_weights:
        raise ValueError("mask must be None when cu_seqlens is given (varlen input has no padding)")
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D of shape (B + 1,), got shape {shape_str(cu_seqlens)}")
    _require_same_device("cu_seqlens", cu_seqlens, x)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]  # HF's flattening collator gives (1, T, H)
    if x.dim() != 2:
        raise ValueError(f"x must be (T, H) or (1, T, H) when cu_seqlens is given, got shape {shape_str(x)}")
    if mask is not None:
        _check_varlen_weights(mask, x)
    return x


def max_seqlen_hint(max_seqlen: int | None, x: Tensor) -> int | None:
    """The max_seqlen hint the kernels get, for a checked x ((B, L, H) or (T, H)): None, or the hint
    clamped to x's sequence axis. A larger hint says nothing more (every backend bounds it by L or
    T), and the clamp keeps any Python int within the int64 of the ops' `int? max_seqlen`."""
    return None if max_seqlen is None else min(max_seqlen, x.shape[-2])


def _check_varlen_weights(weights: Tensor, x: Tensor) -> None:
    """masked_mean's varlen mask: per-token floating weights (T,) for x (T, H)."""
    _require_tensor("mask", weights)
    expected = (
        "mask must be None when cu_seqlens is given (varlen input has no padding) or, for masked_mean "
        "and linear_pool,"
    )
    if not weights.is_floating_point():
        raise TypeError(f"{expected} floating per-token weights (T,); got dtype {weights.dtype}")
    if weights.dim() != 1 or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"{expected} per-token weights of shape (T,) = ({x.shape[0]},) matching x {shape_str(x)}; "
            f"got shape {shape_str(weights)}"
        )
    _require_same_device("mask", weights, x)


def check_scores(scores: Tensor, x: Tensor, varlen: bool) -> int:
    """Checks attention scores against x ((B, L, H) or (T, H)); returns the number of heads."""
    _require_tensor("scores", scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    _require_same_device("scores", scores, x)
    tokens = tuple(x.shape[:-1])  # (B, L) or (T,)
    expected = "(T,) or (T, nh)" if varlen else "(B, L) or (B, L, nh)"
    if tuple(scores.shape) == tokens:
        num_heads = 1
    elif scores.dim() == len(tokens) + 1 and tuple(scores.shape[:-1]) == tokens:
        num_heads = scores.shape[-1]
    else:
        raise ValueError(
            f"scores must be {expected} matching x {shape_str(x)}, got shape {shape_str(scores)}"
        )
    _require_heads_divide("scores", num_heads, x.shape[-1])
    return num_heads


def check_query(query: Tensor, x: Tensor) -> int:
    """Checks a learned query, (H,) or (nh, H/nh), against x; returns the number of heads."""
    _require_tensor("query", query)
    if not query.is_floating_point():
        raise TypeError(f"query must be a floating tensor, got dtype {query.dtype}")
    _require_same_device("query", query, x)
    hidden = x.shape[-1]
    if query.dim() == 1 and query.shape[0] == hidden:
        return 1
    if query.dim() == 2 and query.shape[0] >= 1 and query.shape[0] * query.shape[1] == hidden:
        return query.shape[0]
    raise ValueError(
        f"query must be (H,) = ({hidden},) or (nh, H/nh) with nh dividing H, got {shape_str(query)}"
    )


def check_scale(scale: float | None) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")


def scale_or_default(scale: float | None, head_dim: int) -> float:
    """A checked attention scale as a float; None gives 1/sqrt(head_dim) (1.0 for head_dim 0: no
    channel, any scale)."""
    check_scale(scale)
    if scale is None:
        return head_dim**-0.5 if head_dim else 1.0
    return float(scale)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A str argument that must be one of `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _require_heads_divide(name: str, num_heads: int, hidden: int) -> None:
    if num_heads < 1 or hidden % num_heads:
        raise ValueError(f"{name} has nh = {num_heads} heads, which must divide H = {hidden}")


def validate_cu_seqlens(cu_seqlens: Tensor, num_tokens: int | None = None) -> None:
    """Raises ValueError if cu_seqlens is malformed: not starting at 0, decreasing, or not ending at
    num_tokens (T). Reads the values back to the host: a debugging aid, not for the hot path.
    (The kernels never read or write out of bounds on malformed values: they clamp each segment to
    [0, T]; but the results are then meaningless.)
    """
    _require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D of shape (B + 1,), got shape {shape_str(cu_seqlens)}")
    first = int(cu_seqlens[0])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).nonzero()
    if len(decreasing):
        i = int(decreasing[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu_seqlens[i])} > "
            f"cu_seqlens[{i + 1}] = {int(cu_seqlens[i + 1])}"
        )
    last = int(cu_seqlens[-1])
    if num_tokens is not None and last != num_tokens:
        raise ValueError(f"cu_seqlens must end at T = {num_tokens}, got cu_seqlens[-1] = {last}")


# --- module constructor arguments -----------------------------------------------------------------


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """A module's size or count argument: an int (numpy ints too, not bool) >= minimum, as an int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_heads(hidden_size: object, num_heads: object) -> tuple[int, int]:
    """A module's hidden_size and num_heads (check_count), num_heads dividing hidden_size."""
    hidden_size, num_heads = check_count("hidden_size", hidden_size), check_count("num_heads", num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"num_heads = {num_heads} must divide hidden_size = {hidden_size}")
    return hidden_size, num_heads


def check_backend_name(backend: object) -> str | None:
    """A module's `backend=`: None or one of BACKENDS (whether it can run on the module's device is
    decided at forward, by fused_pool.backends.resolve_backend)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


# --- span_pool --------------------------------------------------------------------------------------

SPAN_MODES = ("mean", "max", "mean_max")


def check_span_inputs(
    x: Tensor, spans: Tensor, mask: Tensor | None, mode: object
) -> tuple[Tensor, Tensor | None]:
    """Checks span_pool's arguments (never their values: malformed spans are clamped by every
    kernel); returns x as (T, H) and the mask as (T,) or None, (B, L, ...) flattened in b L + l order."""
    _require_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (T, H) or (B, L, H), got shape {shape_str(x)}")
    _require_tensor("spans", spans)
    if spans.dtype not in INDEX_DTYPES:
        raise TypeError(f"spans must be int32 or int64, got dtype {spans.dtype}")
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must be (S, 2) [start, end) token offsets, got shape {shape_str(spans)}")
    _require_same_device("spans", spans, x)
    check_choice("mode", mode, SPAN_MODES)
    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype.is_complex:
            raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            expected = "(T,)" if x.dim() == 2 else "(B, L)"
            raise ValueError(
                f"mask must be {expected} = {tuple(x.shape[:-1])} to match x {shape_str(x)}, "
                f"got shape {shape_str(mask)}"
            )
        _require_same_device("mask", mask, x)
        mask = mask.reshape(-1)
    if x.dim() == 3:
        x = x.reshape(x.shape[0] * x.shape[1], x.shape[2])  # a view when the strides allow
    return x, mask


# --- linear_pool ------------------------------------------------------------------------------------

LINEAR_MODES = ("max", "sum", "mean")


def check_linear_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, mode: object, activation: object
) -> None:
    """Checks linear_pool's projection (weight (N, H), bias (N,) or None, in x's dtype, as nn.Linear
    stores them), mode and activation; x is already checked ((B, L, H) or (T, H))."""
    _require_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be (N, H) with H = {x.shape[-1]} (x's last dimension, as nn.Linear stores it), "
            f"got shape {shape_str(weight)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    _require_same_device("weight", weight, x)
    if bias is not None:
        _require_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be (N,) = ({weight.shape[0]},) or None, got shape {shape_str(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        _require_same_device("bias", bias, x)
    check_linear_mode("mode", mode, activation)


def check_linear_mode(mode_name: str, mode: object, activation: object) -> None:
    """linear_pool's mode (named `mode_name`: SpladeHead calls it "pooling") and activation."""
    check_choice(mode_name, mode, LINEAR_MODES)
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None, got {type(activation).__name__}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")


# --- probe_attention_pool ---------------------------------------------------------------------------

MAX_PROBES = 256


def check_probes(probes: Tensor, x: Tensor) -> None:
    """Checks learned probes (P, H), 1 <= P <= MAX_PROBES, against x ((B, L, H) or (T, H))."""
    _require_tensor("probes", probes)
    if not probes.is_floating_point():
        raise TypeError(f"probes must be a floating tensor, got dtype {probes.dtype}")
    _require_same_device("probes", probes, x)
    if probes.dim() != 2 or probes.shape[1] != x.shape[-1]:
        raise ValueError(f"probes must be (P, H) with H = {x.shape[-1]}, got shape {shape_str(probes)}")
    if not 1 <= probes.shape[0] <= MAX_PROBES:
        raise ValueError(f"probes must hold 1 to {MAX_PROBES} probes (P, H), got P = {probes.shape[0]}")
