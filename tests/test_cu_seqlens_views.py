"""What the launchers hand the kernels: `cu_seqlens` given as a strided or expanded view (issue 21).

The Triton kernels read cu_seqlens[b] at cu_seqlens_ptr + b, so a view whose stride is not 1 must
reach them contiguous: `cu[::2]` otherwise reads the elements in between (wrong outputs and
gradients), and an expanded view (stride 0) reads past the view's storage. Every varlen op, forward
and backward, on every backend that runs here, against the reference given the same values
contiguous.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import DEVICES, assert_close, cu_seqlens_of, make_generator, poisoned_allocations

import fused_pool
from fused_pool import reference
from fused_pool.backends import unavailable_reason

BACKENDS = [
    pytest.param(b, d, id=f"{b}-{d}")
    for b, d in itertools.product(("triton", "cuda", "cpu", "torch"), DEVICES)
    if unavailable_reason(b, torch.device(d)) is None and not (b == "torch" and d == "cuda")
]
OPS = ["masked_mean", "masked_max", "masked_mean_max", "attention_pool", "query_attention_pool"]
INDEX_DTYPES = [torch.int32, torch.int64]


def strided_view(cu: torch.Tensor) -> torch.Tensor:
    """cu as every other element of a tensor whose elements in between are other boundaries, so
    that a kernel reading it as contiguous sees different sequences."""
    storage = torch.empty(2 * cu.numel() - 1, dtype=cu.dtype, device=cu.device)
    storage[::2] = cu
    storage[1::2] = cu[-1] - cu[1:]  # the lengths in reverse order: boundaries, but not these
    view = storage[::2]
    assert view.stride() == (2,) and torch.equal(view, cu)
    return view


def expanded_zeros(num_seqs: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[0] * (num_seqs + 1) as an expanded (stride 0) one-element view whose storage goes on with
    other values: a kernel reading it as contiguous sees nonempty sequences."""
    storage = torch.tensor([0, 3, 7, 9], dtype=dtype, device=device)
    view = storage[:1].expand(num_seqs + 1)
    assert view.stride() == (0,)
    return view


def check_varlen_op(op, backend, x, cu_seqlens, seed):
    """Output and the gradients of x (and of scores / query) against the reference given a
    contiguous copy of cu_seqlens."""
    gen = make_generator(seed)
    hidden = x.shape[-1]
    others = []
    if op == "attention_pool":
        others = [torch.randn(x.shape[0], 2, generator=gen).to(x.device)]
    elif op == "query_attention_pool":
        others = [torch.randn(2, hidden // 2, generator=gen).to(x.device)]
    fused = lambda *t: getattr(fused_pool, op)(*t, cu_seqlens=cu_seqlens, backend=backend)
    ref = lambda *t: getattr(reference, op)(*t, cu_seqlens=cu_seqlens.contiguous())
    width = 2 * hidden if op == "masked_mean_max" else hidden
    grad = torch.randn(cu_seqlens.shape[0] - 1, width, generator=gen).to(x.device)
    ref_out, ref_grads = _outputs_and_grads(ref, [x, *others], grad)
    out, grads = _outputs_and_grads(fused, [x, *others], grad, poisoned=True)
    assert_close(out, ref_out)
    for actual, expected in zip(grads, ref_grads, strict=True):
        assert_close(actual, expected)


def _outputs_and_grads(fn, inputs, grad, poisoned=False):
    """helpers.outputs_and_grads, with zero gradients for inputs the output does not depend on (the
    reference of empty sequences)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with poisoned_allocations() if poisoned else contextlib.nullcontext():
        out = fn(*leaves)
        if not out.requires_grad:
            return out, [torch.zeros_like(t) for t in leaves]
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True, materialize_grads=True)
    return out, grads


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[3, 0, 5, 2], [150, 0, 7, 100]], ids=["one_chunk", "split"])
@pytest.mark.parametrize("op", OPS)
def test_strided_cu_seqlens(op, lengths, index_dtype, backend, device):
    """cu_seqlens[::2]; the longer lengths take the split path (chunk offsets read cu_seqlens too)."""
    x = torch.randn(sum(lengths), 8, generator=make_generator(len(lengths))).to(device)
    cu_seqlens = strided_view(cu_seqlens_of(lengths, index_dtype, device))
    check_varlen_op(op, backend, x, cu_seqlens, seed=sum(lengths))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [0, 9])
@pytest.mark.parametrize("op", OPS)
def test_expanded_cu_seqlens(op, num_tokens, index_dtype, backend, device):
    """cu_seqlens = [0, 0, 0] as a stride-0 view: three empty sequences. With 9 tokens the tokens
    past cu_seqlens[-1] belong to no sequence (malformed values are clamped, never read)."""
    x = torch.randn(num_tokens, 8, generator=make_generator(num_tokens)).to(device)
    check_varlen_op(op, backend, x, expanded_zeros(3, index_dtype, device), seed=num_tokens)
