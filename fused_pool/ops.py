"""Op registration (torch.library) and autograd for the fused backends.

Every fused backend provides the same pair of kernels for mean / max / mean_max:

    pool_fwd(x, mask, cu_seqlens, max_seqlen, mode) -> (out, den, argmax)
    pool_bwd(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode) -> dx

`mode` is 1 (mean), 2 (max) or 3 (mean_max); `den` is sum(w) per sequence (mean modes) and `argmax`
the int32 row of each maximum (max modes), or empty tensors. The Triton pair is registered here as
`fused_pool::triton_pool_fwd` / `triton_pool_bwd`. Each registered op gets a fake kernel and
autograd, so `torch.compile(fullgraph=True)` sees one opaque op per call.

Eager calls skip the dispatcher: a custom-op call costs ~11 us of Python on top of the kernel
(measured on a 2-core CPU machine, torch 2.13), so they run the same kernels directly, through an
`autograd.Function` when a gradient is needed. Both paths share `_save_for_pool_backward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

MEAN, MAX, MEAN_MAX = 1, 2, 3


class PoolKernels(NamedTuple):
    """One backend's forward / backward for mean, max and mean_max."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., Tensor]
    forward_op: Callable[..., tuple[Tensor, Tensor, Tensor]]  # the registered op, for torch.compile


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pool_fwd_fake(x, mask, cu_seqlens, max_seqlen, mode):
    num_seqs = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    hidden = x.shape[-1]
    out = x.new_empty(num_seqs, 2 * hidden if mode == MEAN_MAX else hidden)
    den = x.new_empty(num_seqs if mode & MEAN else 0, dtype=_accumulation_dtype(x.dtype))
    argmax = x.new_empty((num_seqs, hidden) if mode & MAX else (0,), dtype=torch.int32)
    return out, den, argmax


def _pool_bwd_fake(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode):
    return grad_out.new_empty(x_shape, dtype=x_dtype)


def _save_for_pool_backward(ctx, x, mask, cu_seqlens, mode, den, argmax) -> None:
    ctx.save_for_backward(mask, cu_seqlens, den, argmax)
    ctx.x_shape, ctx.x_dtype, ctx.mode = list(x.shape), x.dtype, mode


def _register_pool_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        x, mask, cu_seqlens, _max_seqlen, mode = inputs
        _save_for_pool_backward(ctx, x, mask, cu_seqlens, mode, output[1], output[2])

    def backward(ctx, grad_out, _grad_den, _grad_argmax):
        mask, cu_seqlens, den, argmax = ctx.saved_tensors
        dx = backward_op(grad_out, mask, cu_seqlens, den, argmax, ctx.x_shape, ctx.x_dtype, ctx.mode)
        return dx, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


@torch.library.custom_op("fused_pool::triton_pool_fwd", mutates_args=())
def _triton_pool_fwd(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None, mode: int
) -> tuple[Tensor, Tensor, Tensor]:
    from fused_pool.triton_kernels.pool import pool_forward

    return pool_forward(x, mask, cu_seqlens, max_seqlen, mode)


@torch.library.custom_op("fused_pool::triton_pool_bwd", mutates_args=())
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


_triton_pool_fwd.register_fake(_pool_fwd_fake)
_triton_pool_bwd.register_fake(_pool_bwd_fake)
_register_pool_autograd("fused_pool::triton_pool_fwd", torch.ops.fused_pool.triton_pool_bwd)


def _triton_pool_kernels() -> PoolKernels:
    from fused_pool.triton_kernels import pool

    return PoolKernels(pool.pool_forward, pool.pool_backward, torch.ops.fused_pool.triton_pool_fwd)


_POOL_KERNELS: dict[str, Callable[[], PoolKernels]] = {"triton": _triton_pool_kernels}


def pool_kernels(backend: str) -> PoolKernels:
    return _POOL_KERNELS[backend]()


class _EagerPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, cu_seqlens, max_seqlen, mode, kernels):
        out, den, argmax = kernels.forward(x, mask, cu_seqlens, max_seqlen, mode)
        _save_for_pool_backward(ctx, x, mask, cu_seqlens, mode, den, argmax)
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask, cu_seqlens, den, argmax = ctx.saved_tensors
        dx = ctx.kernels.backward(grad_out, mask, cu_seqlens, den, argmax, ctx.x_shape, ctx.x_dtype, ctx.mode)
        return dx, None, None, None, None, None


def pool(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None, mode: int, backend: str
) -> Tensor:
    """Runs mean / max / mean_max on a fused backend; inputs already checked."""
    kernels = pool_kernels(backend)
    if torch.compiler.is_compiling():
        return kernels.forward_op(x, mask, cu_seqlens, max_seqlen, mode)[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerPool.apply(x, mask, cu_seqlens, max_seqlen, mode, kernels)
    return kernels.forward(x, mask, cu_seqlens, max_seqlen, mode)[0]
