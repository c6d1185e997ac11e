"""The one dispatch point, `run(kind, backend, *inputs)`: which kernels each backend runs for each
op kind, their registration as torch ops, and their autograd.

Every backend implements op kind `<kind>` as a forward / backward pair `<kind>_fwd` /
`<kind>_bwd` in the kind's schema (fused_pool.specs, which also holds the fake kernels, the saved
states and the gradient mapping):

    backend   kind              file                                    forward / backward
    "torch"   pool              fused_pool/torch_kernels.py             pool_fwd / pool_bwd
              attention         fused_pool/torch_kernels.py             attention_fwd / attention_bwd
              query_attention   fused_pool/torch_kernels.py             query_attention_fwd / _bwd
              span              fused_pool/torch_kernels.py             span_fwd / span_bwd
              linear            fused_pool/torch_linear.py              linear_fwd / linear_bwd
              probe_attention   fused_pool/torch_probe.py               probe_attention_fwd / _bwd
    "triton"  pool              triton_kernels/pool.py                  pool_fwd / pool_bwd
              attention         triton_kernels/attention.py             attention_fwd / attention_bwd
              query_attention   triton_kernels/attention.py             query_attention_fwd / _bwd
              span              triton_kernels/span.py                  span_fwd / span_bwd
              linear            triton_kernels/linear.py                linear_fwd / linear_bwd
              probe_attention   triton_kernels/probe.py                 probe_attention_fwd / _bwd
    "cpu"     each kind         csrc/cpu/<kind>_cpu.cpp                 the extension's C++ ops
    "cuda"    each kind         csrc/cuda/<kind>_cuda.{cpp,cu}          ext_<kind>_fwd / _bwd

triton_kernels/ is installed as the package fused_pool.triton_kernels. The extension's ops are
`torch.ops.fused_pool.ext_<kind>_fwd` / `_bwd` on both "cpu" and "cuda" (the C++ dispatcher picks
the kernel by the tensors' device). The Python backends' rows are `KERNEL_MODULES` below; a module
is imported on the first call of one of its kernels (Triton costs ~1 s: importing fused_pool must
stay cheap).

Registration (torch.library), so that `torch.compile(fullgraph=True)` sees one opaque op per call:
the Python backends' kernels become the custom ops `fused_pool::<backend>_<kind>_fwd` / `_bwd`
with the spec's schema; the extension registers `fused_pool::ext_<kind>_fwd` / `_bwd` itself
(csrc/fused_pool.cpp), and registration here checks that their schemas equal the spec's. Both get
the spec's fake kernels and autograd. An extension built before a kind existed (a stale build) lacks
its ops: the other kinds still register, and a call of the missing kind on "cpu" / "cuda" raises,
asking for a rebuild (never at import).

Eager calls skip the dispatcher: a custom-op call costs ~11 us of Python on top of the kernel
(measured on a 2-core CPU machine, torch 2.13), so they run the same kernels directly, through an
`autograd.Function` when a gradient is needed. Both paths share each kind's `save` and
`input_grads`, and both are first-order only: differentiating a gradient of a fused_pool op
(create_graph=True, then a second backward through it) raises instead of returning a wrong number.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import extension
from .specs import SPECS, OpSpec

__all__ = ["KERNEL_MODULES", "Kernels", "first_order_grads", "kernels", "run"]

# backend -> kind -> the module holding `<kind>_fwd` / `<kind>_bwd` (the Python backends; "cpu" and
# "cuda" run the extension's ops).
KERNEL_MODULES: dict[str, dict[str, str]] = {
    "torch": {
        "pool": "fused_pool.torch_kernels",
        "attention": "fused_pool.torch_kernels",
        "query_attention": "fused_pool.torch_kernels",
        "span": "fused_pool.torch_kernels",
        "linear": "fused_pool.torch_linear",
        "probe_attention": "fused_pool.torch_probe",
    },
    "triton": {
        "pool": "fused_pool.triton_kernels.pool",
        "attention": "fused_pool.triton_kernels.attention",
        "query_attention": "fused_pool.triton_kernels.attention",
        "span": "fused_pool.triton_kernels.span",
        "linear": "fused_pool.triton_kernels.linear",
        "probe_attention": "fused_pool.triton_kernels.probe",
    },
}


class Kernels(NamedTuple):
    """One backend's forward and backward of one op kind."""

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., Tensor | tuple[Tensor, ...]]
    forward_op: Callable[..., tuple[Tensor, ...]]  # the registered op, for torch.compile


# --- first-order autograd --------------------------------------------------------------------------

DOUBLE_BACKWARD_ERROR = (
    "double backward (second derivatives) of fused_pool ops is not supported: the gradients of a "
    "fused_pool op come from its backward kernel and cannot be differentiated again. Take first-order "
    "gradients only, or use fused_pool.reference where second derivatives are needed."
)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through (the trailing inputs), attached to the differentiable tensors they
    depend on (the leading `num_sources` inputs); differentiating them raises."""

    @staticmethod
    def forward(ctx, num_sources: int, *sources_and_grads: Tensor):
        return tuple(grad.view_as(grad) for grad in sources_and_grads[num_sources:])

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def first_order_grads(spec: OpSpec, ctx, backward: Callable, grad_out: Tensor) -> tuple:
    """`spec.input_grads` from the backward kernel. Under create_graph=True (grad mode on in a
    backward) the kernels' gradients are computed without a graph; where they depend on a tensor
    that requires grad (grad_out, or a saved input such as attention's x), they are attached to it
    through a node that raises if a second backward reaches it, instead of being returned as
    constants (silently wrong second derivatives). Gradients that depend on nothing differentiable
    are constants indeed (a pool's, for a constant grad_out), as with PyTorch's own ops."""
    if not torch.is_grad_enabled():
        return spec.input_grads(ctx, backward, grad_out)
    sources = [t for t in (grad_out, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
    with torch.no_grad():
        grads = spec.input_grads(ctx, backward, grad_out)
    if not sources:
        return grads
    guarded = iter(_FirstOrderOnly.apply(len(sources), *sources, *(g for g in grads if g is not None)))
    return tuple(None if grad is None else next(guarded) for grad in grads)


# --- registration ----------------------------------------------------------------------------------


def _register_autograd(spec: OpSpec, name: str) -> None:
    """Fake kernels and autograd for the registered pair `fused_pool::<name>_fwd` / `_bwd`."""
    torch.library.register_fake(f"fused_pool::{name}_fwd", spec.fake_forward)
    torch.library.register_fake(f"fused_pool::{name}_bwd", spec.fake_backward)
    registered_backward = getattr(torch.ops.fused_pool, f"{name}_bwd").default

    def input_grads(ctx, grad_out, *_unused):
        return first_order_grads(spec, ctx, registered_backward, grad_out)

    torch.library.register_autograd(f"fused_pool::{name}_fwd", input_grads, setup_context=spec.save)


def _register_python(spec: OpSpec, backend: str) -> Callable:
    """Registers `<backend>_<kind>_fwd` / `_bwd` as custom ops calling the backend's kernels (its
    module imported on the first call); returns the forward op."""
    kind, name = spec.kind, f"{backend}_{spec.kind}"

    def forward(*inputs):
        return kernels(backend, kind).forward(*inputs)

    def backward(*inputs):
        return kernels(backend, kind).backward(*inputs)

    torch.library.custom_op(f"fused_pool::{name}_fwd", forward, mutates_args=(), schema=spec.forward_schema)
    torch.library.custom_op(f"fused_pool::{name}_bwd", backward, mutates_args=(), schema=spec.backward_schema)
    _register_autograd(spec, name)
    return getattr(torch.ops.fused_pool, f"{name}_fwd").default


def _schema_of(op) -> str:
    """'(arguments) -> results' of a registered op, without its name."""
    text = str(op.default._schema)
    return text[text.index("(") :]


def _register_extension(spec: OpSpec) -> Kernels:
    """The extension's C++ ops `ext_<kind>_fwd` / `_bwd` (schemas and CPU / CUDA kernels registered
    by fused_pool._C): checks their schemas, adds fake kernels and autograd."""
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


def _extension_defines(kind: str) -> bool:
    """Whether the loaded extension registers `ext_<kind>_fwd` and `_bwd` (a stale build may not)."""
    return all(hasattr(torch.ops.fused_pool, f"ext_{kind}_{step}") for step in ("fwd", "bwd"))


def _register_all() -> tuple[dict[str, dict[str, Callable]], dict[tuple[str, str], Kernels]]:
    """(backend -> kind -> the registered forward op, for every backend whose kernels exist in this
    install; (backend, kind) -> the extension's Kernels, for the kinds the extension defines)."""
    forward_ops = {
        backend: {kind: _register_python(spec, backend) for kind, spec in SPECS.items()}
        for backend in KERNEL_MODULES
    }
    extension_kernels = {}
    if extension() is not None:
        for kind, spec in SPECS.items():
            if not _extension_defines(kind):
                continue  # a call raises (_missing_kind)
            registered = _register_extension(spec)
            for backend in ("cpu", "cuda"):
                forward_ops.setdefault(backend, {})[kind] = registered.forward_op
                extension_kernels[backend, kind] = registered
    return forward_ops, extension_kernels


# A Python backend's Kernels join _KERNELS on their first use.
_FORWARD_OPS, _KERNELS = _register_all()


def _missing_kind(backend: str, kind: str) -> RuntimeError:
    return RuntimeError(
        f"the {backend} backend cannot run op kind {kind!r}: the C++ extension fused_pool._C was built "
        f"without its ops (fused_pool::ext_{kind}_fwd / _bwd), a stale build; rebuild the extension "
        "(pip install --no-build-isolation -e .), or pass another backend"
    )


def kernels(backend: str, kind: str) -> Kernels:
    """`backend`'s kernels of op kind `kind` (the table in this module's docstring)."""
    found = _KERNELS.get((backend, kind))
    if found is None:
        if backend not in KERNEL_MODULES:
            raise _missing_kind(backend, kind)
        module = importlib.import_module(KERNEL_MODULES[backend][kind])
        forward, backward = getattr(module, f"{kind}_fwd"), getattr(module, f"{kind}_bwd")
        found = _KERNELS[backend, kind] = Kernels(forward, backward, _FORWARD_OPS[backend][kind])
    return found


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
        return (None, None, *first_order_grads(SPECS[ctx.kind], ctx, ctx.backward_kernel, grad_out))


def run(kind: str, backend: str, *inputs) -> Tensor:
    """The first output of `kind` on `backend` (inputs already checked and normalized): the one
    place every public op reaches its kernels."""
    if torch.compiler.is_compiling():
        forward_op = _FORWARD_OPS.get(backend, {}).get(kind)
        if forward_op is None:
            raise _missing_kind(backend, kind)
        return forward_op(*inputs)[0]
    chosen = kernels(backend, kind)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _EagerFunction.apply(kind, chosen, *inputs)[0]
    return chosen.forward(*inputs)[0]
