"""Which backends can run here, and which one a call uses.

- "triton": the Triton kernels; CUDA tensors on a GPU, or CPU tensors through Triton's
  interpreter when TRITON_INTERPRET=1 (how CI runs them).
- "cuda" / "cpu": the C++/CUDA extension `fused_pool._C`, on CUDA / CPU tensors.
- "torch": plain PyTorch kernels with the fused backends' contract (`fused_pool.torch_kernels`);
  runs everywhere. (`fused_pool.reference` stays the oracle the tests compare against.)

Default (backend=None and no FUSED_POOL_BACKEND): Triton for CUDA tensors when it imports, else
the CUDA extension; the CPU extension for CPU tensors; "torch" where nothing else can run.
The kernels each backend runs for each op kind are listed in fused_pool.ops (the dispatch point).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "FUSED_POOL_BACKEND"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"Triton does not import ({type(error).__name__}: {error})"
    return None


@functools.cache
def extension():
    """The compiled extension module, or None if it was not built."""
    try:
        return importlib.import_module("fused_pool._C")
    except ImportError:
        return None


def extension_has_cuda() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_cuda())


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors on `device`, or None if it can."""
    return _unavailable_reason(backend, device.type, triton_interpret())


@functools.cache
def _unavailable_reason(backend: str, device: str, interpret: bool) -> str | None:
    if backend == "torch":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available"
    if backend == "triton":
        if (error := _triton_import_error()) is not None:
            return error
        if device == "cuda":
            return None
        if device == "cpu" and interpret:
            return None
        return (
            f"the triton backend runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
            f"before Triton is imported; got tensors on {device}"
        )
    if backend in ("cpu", "cuda"):
        if extension() is None:
            return (
                f"the {backend} backend needs the C++ extension fused_pool._C, which is not built "
                "(reinstall with `pip install --no-build-isolation -e .`)"
            )
        if device != backend:
            return f"the {backend} backend runs on {backend.upper()} tensors; got tensors on {device}"
        if backend == "cuda" and not extension_has_cuda():
            return "fused_pool._C was built without CUDA kernels (no CUDA toolkit or a CPU build of torch)"
    return None


def available_backends() -> list[str]:
    """The backends that can run here (on some device of this machine)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call on `device` uses; raises if the one asked for cannot run.

    Under torch.compile the choice is made once, while tracing, and baked into the graph.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    return _resolve(backend or os.environ.get(ENV_VAR) or None, device.type, triton_interpret())


@functools.cache
def _resolve(backend: str | None, device: str, interpret: bool) -> str:
    if backend is not None:
        reason = _unavailable_reason(backend, device, interpret)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run: {reason}")
        return backend
    preferred = ("triton", "cuda", "torch") if device == "cuda" else ("cpu", "torch")
    return next(b for b in preferred if _unavailable_reason(b, device, interpret) is None)


# What torch.compiler.assume_constant_result(resolve_backend) does, without importing torch._dynamo
# (and with it Triton: ~1.3 s) when fused_pool is imported. The fullgraph compile tests fail if
# torch renames the marker.
resolve_backend._dynamo_marked_constant = True
