"""Shared test helpers: which fused backends run here, tolerances, poisoned allocations, inputs, the
attention check against the reference, the marks of tests that call the extension's ops directly."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import zlib

import pytest
import torch

import fused_pool
from fused_pool import reference
from fused_pool.backends import extension, extension_has_cuda, unavailable_reason
from fused_pool.ops import KERNEL_MODULES

FUSED_BACKENDS = ("triton", "cuda", "cpu")
DEVICES = ("cpu", "cuda")

# (backend, device) pairs whose kernels can run on this machine.
FUSED = [
    pytest.param(b, d, id=f"{b}-{d}")
    for b, d in itertools.product(FUSED_BACKENDS, DEVICES)
    if unavailable_reason(b, torch.device(d)) is None
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Per-dtype tolerances for results that involve arithmetic (sums, softmax). Both the kernels and
# the reference accumulate in float32 and round once, so low-precision outputs differ by at most
# about one unit in the last place.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype=None, exact=False, **kwargs):
    if exact:
        kwargs.update(atol=0, rtol=0)
    else:
        for key, value in TOLERANCES[dtype or expected.dtype].items():
            kwargs.setdefault(key, value)
    torch.testing.assert_close(actual, expected, equal_nan=True, **kwargs)


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty inside is filled with NaN (floats) or the max value (ints), so an output
    element a kernel forgets to write shows up."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode())


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Every kind of mask make_mask builds.
MASKS = ["none", "bool", "int", "float", "left_padded"]


def make_mask(kind: str, batch: int, length: int, gen: torch.Generator) -> torch.Tensor | None:
    """Masks with an empty sequence and a single-token sequence whenever B allows."""
    if kind == "none":
        return None
    keep = torch.rand(batch, length, generator=gen) > 0.35
    if kind == "left_padded":  # HF decoder style: padding on the left
        lengths = torch.randint(0, length + 1, (batch,), generator=gen)
        keep = torch.arange(length) >= (length - lengths)[:, None]
    if batch >= 2:
        keep[1] = False  # an empty sequence
    if batch >= 3:
        keep[2] = False
        keep[2, length // 2] = True  # a single kept token
    if kind in ("bool", "left_padded"):
        return keep
    if kind == "int":
        return keep.long()
    if kind == "float":  # per-token weights in (0.25, 2], zero where not kept
        return torch.where(keep, torch.rand(batch, length, generator=gen) * 1.75 + 0.25, 0.0)
    raise ValueError(kind)


def poison_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """NaN in every position that is not kept: padding must never be read."""
    if mask is None:
        return x
    return x.masked_fill_((mask == 0)[..., None], float("nan"))  # in place: keeps x's strides


def cu_seqlens_of(lengths, dtype=torch.int32, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def outputs_and_grads(fn, inputs, grad, poisoned=False):
    """fn(*leaves) and the gradients of <out, grad> with respect to every input, each input a fresh
    leaf. With `poisoned`, every allocation inside is NaN-filled first."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with poisoned_allocations() if poisoned else contextlib.nullcontext():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
    return out, grads


def grad_of(fn, x, *args, grad=None, **kwargs):
    x = x.clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out) if grad is None else grad)
    return out.detach(), dx


def random_like_output(shape, dtype, device, seed=0):
    return torch.randn(shape, generator=make_generator(seed)).to(device, dtype)


# Floor of the 2x rule below, relative to the largest exact value: PyTorch's own formulation can be
# exact where a kernel's is not (one kept token: the softmax Jacobian is exactly 0 in autograd, while
# p (g.x - g.out) cancels two float32 dot products).
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_within_reference_error(actual, reference_out, exact_out, dtype, floor_factor=1.0):
    """flash-attention's rule: the max error of `actual` against a float64 computation is at most
    twice the max error of the PyTorch reference run at the inputs' precision, plus a floor relative
    to the largest exact value (times `floor_factor`: sqrt(n) for a sum of n products taken in
    another order than the reference's). Fits results that are long dot products."""
    exact = exact_out.double()
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN in different places"
    error = (actual.double() - exact).abs().masked_fill(nan, 0).max().item() if actual.numel() else 0.0
    allowed = (
        (reference_out.double() - exact).abs().masked_fill(nan, 0).max().item() if actual.numel() else 0.0
    )
    scale = max(1.0, exact.masked_fill(nan, 0).abs().max().item()) if actual.numel() else 1.0
    floor = ERROR_FLOOR[dtype] * scale * floor_factor
    assert error <= 2 * allowed + floor, (
        f"error {error:.3g} > 2 x reference error {allowed:.3g} + {floor:.3g}"
    )


# --- attention pooling: inputs and the check against the reference ---------------------------------


# (B, L, H): L = 1, L not a multiple of any block, H not a power of two, a split sequence.
ATTENTION_PADDED_SHAPES = [(1, 1, 4), (3, 37, 40), (3, 70, 1000), (3, 300, 64)]
HEADS = [1, 4]


def make_scores(token_shape, num_heads, dtype, device, gen, scale=2.0):
    """Scores of one head as (B, L) / (T,), several as (..., nh)."""
    shape = token_shape if num_heads == 1 else (*token_shape, num_heads)
    return (torch.randn(shape, generator=gen) * scale).to(device, dtype)


def make_query(hidden, num_heads, dtype, device, gen):
    shape = (hidden,) if num_heads == 1 else (num_heads, hidden // num_heads)
    return torch.randn(shape, generator=gen).to(device, dtype)


def check_attention(op, backend, x, other, mask=None, seed=0, **kwargs):
    """Output and the gradients of x and of scores / query against the reference. Gradients are
    dot products over the head (ds = p (g.x - g.out)): they must be within twice the reference's
    own error against float64."""
    ref = lambda a, b: getattr(reference, op)(a, b, mask, **kwargs)
    fused = lambda a, b: getattr(fused_pool, op)(a, b, mask, backend=backend, **kwargs)
    grad = random_like_output(ref(x, other).shape, x.dtype, x.device, seed)
    ref_out, ref_grads = outputs_and_grads(ref, [x, other], grad)
    _, exact_grads = outputs_and_grads(ref, [x.double(), other.double()], grad.double())
    out, grads = outputs_and_grads(fused, [x, other], grad, poisoned=True)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == ref_out.shape
    assert_close(out, ref_out)
    for actual, expected, exact, source in zip(grads, ref_grads, exact_grads, (x, other), strict=True):
        assert actual.shape == source.shape and actual.dtype == source.dtype
        dtype = max(x.dtype, source.dtype, key=lambda d: torch.finfo(d).eps)
        assert_within_reference_error(actual, expected, exact, dtype)
    return out, grads


# --- the C++/CUDA extension's ops called directly (torch.ops.fused_pool.ext_*) ----------------------

HAS_CUDA_EXTENSION = torch.cuda.is_available() and extension() is not None and extension_has_cuda()
needs_extension = pytest.mark.skipif(extension() is None, reason="fused_pool._C is not built")
needs_cuda_extension = pytest.mark.skipif(
    not HAS_CUDA_EXTENSION, reason="needs a CUDA GPU and the extension's CUDA kernels"
)
EXTENSION_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA_EXTENSION else [])


# --- span_pool: FUSED plus the torch backend ------------------------------------------------------

SPAN_BACKENDS = [
    pytest.param("torch", d, id=f"torch-{d}") for d in DEVICES if d == "cpu" or torch.cuda.is_available()
] + list(FUSED)


def kernel_backends(kind: str) -> list:
    """SPAN_BACKENDS narrowed to those that have op kind `kind`'s kernels in this checkout: "torch"
    always, "triton" once its module exists, "cpu" / "cuda" once the extension registers
    ext_<kind>_fwd / _bwd (for kinds whose kernels land backend by backend)."""

    def has_kernels(backend: str) -> bool:
        if backend in KERNEL_MODULES:
            return importlib.util.find_spec(KERNEL_MODULES[backend][kind]) is not None
        return all(hasattr(torch.ops.fused_pool, f"ext_{kind}_{step}") for step in ("fwd", "bwd"))

    return [p for p in SPAN_BACKENDS if has_kernels(p.values[0])]


def cpu_kernel_backends(kind: str) -> list[str]:
    """The names of kernel_backends(kind) that run on CPU tensors here."""
    return [p.values[0] for p in kernel_backends(kind) if p.values[1] == "cpu"]
