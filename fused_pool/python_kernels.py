"""The Python backends' kernels ("triton", "torch") in the op kinds' signatures (fused_pool.specs).

fused_pool.triton_kernels.pool / .attention export the kinds' signatures themselves (`pool_fwd`,
...); fused_pool.torch_kernels provides four launchers, `pool_forward` / `pool_backward` and
`attention_forward` / `attention_backward` (scores or query), that this module adapts to the kinds.
Triton is imported on the first call only: importing fused_pool must stay cheap.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

_TRITON_MODULES = {
    "pool": "fused_pool.triton_kernels.pool",
    "attention": "fused_pool.triton_kernels.attention",
}


@functools.cache
def _launchers(backend: str, kind: str):
    if backend == "torch":
        return importlib.import_module("fused_pool.torch_kernels")
    return importlib.import_module(_TRITON_MODULES[kind])


def _pool_fwd(backend: str):
    def forward(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None, mode: int):
        return _launchers(backend, "pool").pool_forward(x, mask, cu_seqlens, max_seqlen, mode)

    forward.__name__ = f"{backend}_pool_fwd"
    return forward


def _pool_bwd(backend: str):
    def backward(
        grad_out: Tensor,
        mask: Tensor | None,
        cu_seqlens: Tensor | None,
        den: Tensor,
        argmax: Tensor,
        x_shape: Sequence[int],
        x_dtype: torch.dtype,
        mode: int,
    ) -> Tensor:
        launchers = _launchers(backend, "pool")
        return launchers.pool_backward(grad_out, mask, cu_seqlens, den, argmax, list(x_shape), x_dtype, mode)

    backward.__name__ = f"{backend}_pool_bwd"
    return backward


def _attention_fwd(backend: str):
    def forward(x, scores, mask, cu_seqlens, max_seqlen):
        launchers = _launchers(backend, "attention")
        return launchers.attention_forward(x, scores, None, mask, cu_seqlens, max_seqlen, 1.0)

    forward.__name__ = f"{backend}_attention_fwd"
    return forward


def _attention_bwd(backend: str):
    def backward(grad_out, x, scores, mask, cu_seqlens, out, stats):
        launchers = _launchers(backend, "attention")
        return launchers.attention_backward(grad_out, x, scores, None, mask, cu_seqlens, out, stats, 1.0)

    backward.__name__ = f"{backend}_attention_bwd"
    return backward


def _query_attention_fwd(backend: str):
    def forward(x, query, mask, cu_seqlens, max_seqlen, scale):
        launchers = _launchers(backend, "attention")
        return launchers.attention_forward(x, None, query.contiguous(), mask, cu_seqlens, max_seqlen, scale)

    forward.__name__ = f"{backend}_query_attention_fwd"
    return forward


def _query_attention_bwd(backend: str):
    def backward(grad_out, x, query, mask, cu_seqlens, out, stats, scale):
        launchers = _launchers(backend, "attention")
        return launchers.attention_backward(
            grad_out, x, None, query.contiguous(), mask, cu_seqlens, out, stats, scale
        )

    backward.__name__ = f"{backend}_query_attention_bwd"
    return backward


def _triton(kind: str, name: str):
    """fused_pool.triton_kernels' function `name`, already in the kind's signature."""

    def kernel(*args):
        return getattr(_launchers("triton", kind), name)(*args)

    kernel.__name__ = f"triton_{name}"
    return kernel


triton_pool_fwd, triton_pool_bwd = _triton("pool", "pool_fwd"), _triton("pool", "pool_bwd")
triton_attention_fwd = _triton("attention", "attention_fwd")
triton_attention_bwd = _triton("attention", "attention_bwd")
triton_query_attention_fwd = _triton("attention", "query_attention_fwd")
triton_query_attention_bwd = _triton("attention", "query_attention_bwd")

torch_pool_fwd, torch_pool_bwd = _pool_fwd("torch"), _pool_bwd("torch")
torch_attention_fwd, torch_attention_bwd = _attention_fwd("torch"), _attention_bwd("torch")
torch_query_attention_fwd = _query_attention_fwd("torch")
torch_query_attention_bwd = _query_attention_bwd("torch")
