"""Shared test helpers: which fused backends run here, tolerances, poisoned allocations, inputs."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from fused_pool.backends import unavailable_reason

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


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
