"""Op registration (torch.library) and autograd for the fused backends.

Every fused backend provides the same three forward / backward kernel pairs:

    pool:            (x, mask, cu_seqlens, max_seqlen, mode) -> (out, den, argmax)
                     backward: (grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode) -> dx
    attention:       (x, scores, mask, cu_seqlens, max_seqlen) -> (out, stats)
                     backward: (grad_out, x, scores, mask, cu_seqlens, out, stats) -> (dx, dscores)
    query_attention: (x, query, mask, cu_seqlens, max_seqlen, scale) -> (out, stats)
                     backward: (grad_out, x, query, mask, cu_seqlens, out, stats, scale) -> (dx, dquery)

pool `mode` is 1 (mean), 2 (max) or 3 (mean_max); `den` is sum(w) per sequence (mean modes) and
`argmax` the int32 row of each maximum (max modes), else empty. Attention `out` is float32
(float64 for float64 x; the caller casts it to x's dtype) and `stats` the (B, nh, 2) softmax
running max and sum; scores are (B, L, nh) / (T, nh) and query (nh, H / nh).

The Triton kernels are registered here as `fused_pool::triton_<kind>_fwd` / `_bwd`; the C++/CUDA
extension registers its own as `fused_pool::ext_<kind>_fwd` / `_bwd` (csrc/). Every registered
forward op gets a fake kernel and autograd, so `torch.compile(fullgraph=True)` sees
one opaque op per call. Eager calls skip the dispatcher: a custom-op call costs ~11 us of Python
on top of the kernel (measured on a 2-core CPU machine, torch 2.13), so they run the same kernels
directly, through an `autograd.Function` when a gradient is needed. Both paths share each kind's
`save` and `input_grads`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import extension

MEAN, MAX, MEAN_MAX = 1, 2, 3


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Kernels(NamedTuple):
    """One backend's forward and backward of one op kind."""

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., Tensor | tuple[Tensor, ...]]
    forward_op: Callable[..., tuple[Tensor, ...]]  # the registered op, for torch.compile


# --- what each kind saves for backward and how its kernel gradients map to its inputs -------------


class _Pool:
    @staticmethod
    def save(ctx, inputs, output):
        x, mask, cu_seqlens, _max_seqlen, mode = inputs
        ctx.save_for_backward(mask, cu_seqlens, output[1], output[2])
        ctx.x_shape, ctx.x_dtype, ctx.mode = list(x.shape), x.dtype, mode

    @staticmethod
    def input_grads(ctx, backward, grad_out, *_unused):
        mask, cu_seqlens, den, argmax = ctx.saved_tensors
        dx = backward(grad_out, mask, cu_seqlens, den, argmax, ctx.x_shape, ctx.x_dtype, ctx.mode)
        return dx, None, None, None, None

    @staticmethod
    def fake_forward(x, mask, cu_seqlens, max_seqlen, mode):
        num_seqs = _num_seqs(x, cu_seqlens)
        hidden = x.shape[-1]
        out = x.new_empty(num_seqs, 2 * hidden if mode == MEAN_MAX else hidden)
        den = x.new_empty(num_seqs if mode & MEAN else 0, dtype=_accumulation_dtype(x.dtype))
        argmax = x.new_empty((num_seqs, hidden) if mode & MAX else (0,), dtype=torch.int32)
        return out, den, argmax

    @staticmethod
    def fake_backward(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode):
        return grad_out.new_empty(x_shape, dtype=x_dtype)


class _Attention:
    """attention_pool and query_attention_pool: the second input (scores or query) gets a gradient;
    query attention has a trailing `scale`."""

    @staticmethod
    def save(ctx, inputs, output):
        x, scores_or_query, mask, cu_seqlens, _max_seqlen, *scale = inputs
        ctx.save_for_backward(x, scores_or_query, mask, cu_seqlens, *output)
        ctx.scale = scale

    @staticmethod
    def input_grads(ctx, backward, grad_out, *_unused):
        x, scores_or_query, mask, cu_seqlens, out, stats = ctx.saved_tensors
        dx, dother = backward(grad_out, x, scores_or_query, mask, cu_seqlens, out, stats, *ctx.scale)
        return (dx, dother, None, None, None) + (None,) * len(ctx.scale)

    @staticmethod
    def fake_forward(x, scores_or_query, mask, cu_seqlens, max_seqlen, *scale):
        num_heads = scores_or_query.shape[0] if scale else scores_or_query.shape[-1]
        acc = _accumulation_dtype(x.dtype)
        num_seqs = _num_seqs(x, cu_seqlens)
        return x.new_empty(num_seqs, x.shape[-1], dtype=acc), x.new_empty(num_seqs, num_heads, 2, dtype=acc)

    @staticmethod
    def fake_backward(grad_out, x, scores_or_query, mask, cu_seqlens, out, stats, *scale):
        return x.new_empty(x.shape), scores_or_query.new_empty(scores_or_query.shape)


def _num_seqs(x: Tensor, cu_seqlens: Tensor | None):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _register_autograd(kind, name: str) -> None:
    """Fake kernels and autograd for the registered pair `fused_pool::<name>_fwd` / `_bwd`."""
    torch.library.register_fake(f"fused_pool::{name}_fwd", kind.fake_forward)
    torch.library.register_fake(f"fused_pool::{name}_bwd", kind.fake_backward)
    registered_backward = getattr(torch.ops.fused_pool, f"{name}_bwd").default

    def input_grads(ctx, *grads):
        return kind.input_grads(ctx, registered_backward, *grads)

    torch.library.register_autograd(f"fused_pool::{name}_fwd", input_grads, setup_context=kind.save)


def _register_python(kind, forward: Callable, backward: Callable, name: str) -> Kernels:
    """Registers Python kernels as custom ops; eager calls use the plain functions."""
    torch.library.custom_op(f"fused_pool::{name}_fwd", forward, mutates_args=())
    torch.library.custom_op(f"fused_pool::{name}_bwd", backward, mutates_args=())
    _register_autograd(kind, name)
    return Kernels(forward, backward, getattr(torch.ops.fused_pool, f"{name}_fwd").default)


def _register_extension(kind, name: str) -> Kernels:
    """The extension's C++ ops (schemas and CPU / CUDA kernels registered by fused_pool._C)."""
    _register_autograd(kind, name)
    forward_op = getattr(torch.ops.fused_pool, f"{name}_fwd").default
    return Kernels(forward_op, getattr(torch.ops.fused_pool, f"{name}_bwd").default, forward_op)


# --- the Triton kernels, with the types the op schemas are inferred from ---------------------------


def _triton_pool_fwd(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None, mode: int
) -> tuple[Tensor, Tensor, Tensor]:
    from fused_pool.triton_kernels.pool import pool_forward

    return pool_forward(x, mask, cu_seqlens, max_seqlen, mode)


def _triton_pool_bwd(
    grad_out: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    den: Tensor,
    argmax: Tensor,
    x_shape: Sequence[int],
    x_dtype: torch.dtype,
    mode: int,
) -> Tensor:
    from fused_pool.triton_kernels.pool import pool_backward

    return pool_backward(grad_out, mask, cu_seqlens, den, argmax, list(x_shape), x_dtype, mode)


def _triton_attention_fwd(
    x: Tensor, scores: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None
) -> tuple[Tensor, Tensor]:
    from fused_pool.triton_kernels.attention import attention_forward

    return attention_forward(x, scores, None, mask, cu_seqlens, max_seqlen, 1.0)


def _triton_attention_bwd(
    grad_out: Tensor,
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    out: Tensor,
    stats: Tensor,
) -> tuple[Tensor, Tensor]:
    from fused_pool.triton_kernels.attention import attention_backward

    return attention_backward(grad_out, x, scores, None, mask, cu_seqlens, out, stats, 1.0)


def _triton_query_attention_fwd(
    x: Tensor,
    query: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    from fused_pool.triton_kernels.attention import attention_forward

    return attention_forward(x, None, query.contiguous(), mask, cu_seqlens, max_seqlen, scale)


def _triton_query_attention_bwd(
    grad_out: Tensor,
    x: Tensor,
    query: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    out: Tensor,
    stats: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    from fused_pool.triton_kernels.attention import attention_backward

    return attention_backward(grad_out, x, None, query.contiguous(), mask, cu_seqlens, out, stats, scale)


_KERNELS: dict[str, dict[str, Kernels]] = {
    "triton": {
        "pool": _register_python(_Pool, _triton_pool_fwd, _triton_pool_bwd, "triton_pool"),
        "attention": _register_python(
            _Attention, _triton_attention_fwd, _triton_attention_bwd, "triton_attention"
        ),
        "query_attention": _register_python(
            _Attention, _triton_query_attention_fwd, _triton_query_attention_bwd, "triton_query_attention"
        ),
    }
}

# The C++/CUDA extension: one set of ops for both the "cpu" and the "cuda" backend (the dispatcher
# picks the kernel by device).
if extension() is not None:
    _KERNELS["cpu"] = _KERNELS["cuda"] = {
        "pool": _register_extension(_Pool, "ext_pool"),
        "attention": _register_extension(_Attention, "ext_attention"),
        "query_attention": _register_extension(_Attention, "ext_query_attention"),
    }


def kernels(backend: str, kind: str) -> Kernels:
    return _KERNELS[backend][kind]


# --- running a kind on a backend -----------------------------------------------------------------

_KINDS = {"pool": _Pool, "attention": _Attention, "query_attention": _Attention}


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, chosen, *inputs):
        outputs = chosen.forward(*inputs)
        _KINDS[kind].save(ctx, inputs, outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.kind, ctx.backward_kernel = kind, chosen.backward
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        return (None, None, *_KINDS[ctx.kind].input_grads(ctx, ctx.backward_kernel, grad_out))


def run(kind: str, backend: str, *inputs) -> Tensor:
    """The first output of `kind` on a fused backend (inputs already checked and normalized)."""
    chosen = kernels(backend, kind)
    if torch.compiler.is_compiling():
        return chosen.forward_op(*inputs)[0]
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs[:2]):
        return _EagerFunction.apply(kind, chosen, *inputs)[0]
    return chosen.forward(*inputs)[0]
