"""Op registration (torch.library), autograd, and the one dispatch point: `run(kind, backend, ...)`.

Each op kind's facts (schema, fake kernels, saved states, gradient mapping, backend table) live in
fused_pool.specs. This module registers every (backend, kind) pair as a pair of ops
`fused_pool::<prefix>_<kind>_fwd` / `_bwd` with fake kernels and autograd, so that
`torch.compile(fullgraph=True)` sees one opaque op per call:

- "triton" and "torch": Python kernels, registered here as `triton_*` / `torch_*` custom ops with
  the spec's schema;
- "cpu" and "cuda": the C++/CUDA extension's `ext_*` ops (one set for both backends: the C++
  dispatcher picks the kernel by device). Their schemas are defined in csrc/ and must equal the
  spec's; registration checks that.

Eager calls skip the dispatcher: a custom-op call costs ~11 us of Python on top of the kernel
(measured on a 2-core CPU machine, torch 2.13), so they run the same kernels directly, through an
`autograd.Function` when a gradient is needed. Both paths share each kind's `save` and
`input_grads`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import extension
from .specs import EXTENSION, MAX, MEAN, MEAN_MAX, SPECS, OpSpec, accumulation_dtype

__all__ = ["MAX", "MEAN", "MEAN_MAX", "Kernels", "accumulation_dtype", "kernels", "run"]


class Kernels(NamedTuple):
    """One backend's forward and backward of one op kind."""

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., Tensor | tuple[Tensor, ...]]
    forward_op: Callable[..., tuple[Tensor, ...]]  # the registered op, for torch.compile


def _register_autograd(spec: OpSpec, name: str) -> None:
    """Fake kernels and autograd for the registered pair `fused_pool::<name>_fwd` / `_bwd`."""
    torch.library.register_fake(f"fused_pool::{name}_fwd", spec.fake_forward)
    torch.library.register_fake(f"fused_pool::{name}_bwd", spec.fake_backward)
    registered_backward = getattr(torch.ops.fused_pool, f"{name}_bwd").default

    def input_grads(ctx, *grads):
        return spec.input_grads(ctx, registered_backward, *grads)

    torch.library.register_autograd(f"fused_pool::{name}_fwd", input_grads, setup_context=spec.save)


def _register_python(spec: OpSpec, backend: str) -> Kernels:
    """Registers a Python backend's kernels as custom ops; eager calls use the plain functions."""
    forward, backward = spec.backends[backend]
    name = f"{backend}_{spec.kind}"
    torch.library.custom_op(f"fused_pool::{name}_fwd", forward, mutates_args=(), schema=spec.forward_schema)
    torch.library.custom_op(f"fused_pool::{name}_bwd", backward, mutates_args=(), schema=spec.backward_schema)
    _register_autograd(spec, name)
    return Kernels(forward, backward, getattr(torch.ops.fused_pool, f"{name}_fwd").default)


def _schema_of(op) -> str:
    """'(arguments) -> results' of a registered op, without its name."""
    text = str(op.default._schema)
    return text[text.index("(") :]


def _register_extension(spec: OpSpec) -> Kernels:
    """The extension's C++ ops (schemas and CPU / CUDA kernels registered by fused_pool._C)."""
    name = f"ext_{spec.kind}"
    forward_op = getattr(torch.ops.fused_pool, f"{name}_fwd")
    backward_op = getattr(torch.ops.fused_pool, f"{name}_bwd")
    for op, expected in ((forward_op, spec.forward_schema), (backward_op, spec.backward_schema)):
        if _schema_of(op) != expected:
            raise RuntimeError(
                f"fused_pool._C registers {op.default._schema}, but fused_pool.specs expects "
                f"{expected}: rebuild the extension (pip install --no-build-isolation -e .)"
            )
    _register_autograd(spec, name)
    return Kernels(forward_op.default, backward_op.default, forward_op.default)


def _register_all() -> dict[str, dict[str, Kernels]]:
    """backend -> kind -> Kernels, for every backend whose kernels exist in this install."""
    table: dict[str, dict[str, Kernels]] = {}
    has_extension = extension() is not None
    for spec in SPECS.values():
        extension_kernels = _register_extension(spec) if has_extension else None
        for backend, entry in spec.backends.items():
            if entry == EXTENSION:
                if extension_kernels is not None:
                    table.setdefault(backend, {})[spec.kind] = extension_kernels
            else:
                table.setdefault(backend, {})[spec.kind] = _register_python(spec, backend)
    return table


_KERNELS = _register_all()


def kernels(backend: str, kind: str) -> Kernels:
    return _KERNELS[backend][kind]


# --- running a kind on a backend -----------------------------------------------------------------


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, chosen, *inputs):
        outputs = chosen.forward(*inputs)
        SPECS[kind].save(ctx, inputs, outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.kind, ctx.backward_kernel = kind, chosen.backward
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        return (None, None, *SPECS[ctx.kind].input_grads(ctx, ctx.backward_kernel, grad_out))


def run(kind: str, backend: str, *inputs) -> Tensor:
    """The first output of `kind` on `backend` (inputs already checked and normalized): the one
    place every public op reaches its kernels."""
    chosen = kernels(backend, kind)
    if torch.compiler.is_compiling():
        return chosen.forward_op(*inputs)[0]
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs[:2]):
        return _EagerFunction.apply(kind, chosen, *inputs)[0]
    return chosen.forward(*inputs)[0]
