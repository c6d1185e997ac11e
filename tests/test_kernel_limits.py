"""Regression tests for the limits a kernel review found: query heads wider than one register tile,
offsets past 2^31 elements, the saved varlen argmax, the float64 softmax scale and the launch
device."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton.language as tl
from helpers import FUSED, assert_close, cu_seqlens_of, make_generator, make_mask, poison_padding
from test_attention import check_attention, make_query

import fused_pool
from fused_pool import reference
from fused_pool.contract import MAX
from fused_pool.ops import kernels

TRITON = [p for p in FUSED if p.values[0] == "triton"]


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Shrinks the widest single-tile query head so that small heads take the wide-head kernels
    (at sizes the interpreter runs quickly)."""
    from fused_pool.triton_kernels import wide_query

    monkeypatch.setattr(wide_query, "QUERY_MAX_BLOCK_D", 16)
    monkeypatch.setattr(wide_query, "WIDE_BLOCK_D", 16)
    monkeypatch.setattr(wide_query, "WIDE_BLOCK_R", 16)


@pytest.mark.parametrize("backend, device", TRITON)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize(
    "mask_kind, dtype", [("none", torch.float32), ("bool", torch.bfloat16), ("float", torch.float32)], ids=str
)
def test_wide_query_heads_padded(narrow_tiles, mask_kind, dtype, num_heads, backend, device):
    gen = make_generator(num_heads)
    hidden = 40 * num_heads  # head_dim 40: three 16-channel slices, the last one partial
    x = torch.randn(3, 9, hidden, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, 3, 9, gen)
    mask = mask if mask is None else mask.to(device)
    query = make_query(hidden, num_heads, dtype, device, gen)
    check_attention("query_attention_pool", backend, poison_padding(x, mask), query, mask)


@pytest.mark.parametrize("backend, device", TRITON)
def test_wide_query_heads_split(narrow_tiles, backend, device):
    gen = make_generator(10)
    x = torch.randn(1, 290, 2 * 20, generator=gen).to(device)  # 290 rows: split into 128-row chunks
    mask = torch.rand(1, 290, generator=gen).to(device) + 0.2
    query = make_query(2 * 20, 2, torch.float32, device, gen)
    check_attention("query_attention_pool", backend, x, query, mask)


@pytest.mark.parametrize("backend, device", TRITON)
@pytest.mark.parametrize("max_seqlen", [None, 140])
def test_wide_query_heads_varlen(narrow_tiles, max_seqlen, backend, device):
    gen = make_generator(11)
    lengths = [140, 0, 1, 20]
    x = torch.randn(sum(lengths), 2 * 20, generator=gen).to(device)
    query = make_query(2 * 20, 2, torch.float32, device, gen)
    kwargs = dict(cu_seqlens=cu_seqlens_of(lengths, device=device), max_seqlen=max_seqlen)
    check_attention("query_attention_pool", backend, x, query, **kwargs)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("head_dim", [8192, 16384])
def test_real_wide_query_head(head_dim, backend, device):
    gen = make_generator(head_dim)
    x = torch.randn(2, 7, head_dim, generator=gen).to(device)
    query = make_query(head_dim, 1, torch.float32, device, gen) * head_dim**-0.25
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0] * 7], dtype=torch.bool, device=device)
    check_attention("query_attention_pool", backend, poison_padding(x, mask), query, mask)


def test_wide_query_kernels_take_wide_heads():
    """Heads past the single-tile limit must not take the single-tile kernels (they spill)."""
    from fused_pool.triton_kernels import attention, wide_query

    assert not attention._is_wide(wide_query.QUERY_MAX_BLOCK_D, query=True)
    assert attention._is_wide(wide_query.QUERY_MAX_BLOCK_D + 1, query=True)
    assert not attention._is_wide(16384, query=False)  # attention mode blocks the head anyway


def _strided_past_int32(dtype=torch.bfloat16):
    """x (1, 5, 3) whose channel stride is 2^30 elements: channel 2 starts at element 2^31, where
    an int32 offset wraps negative. The 4 GiB storage is never touched beyond these 15 values."""
    storage = torch.empty(2**31 + 8, dtype=dtype)
    x = storage.as_strided((1, 5, 3), (0, 1, 2**30))
    values = torch.randn(1, 5, 3, generator=make_generator(3)).to(dtype)
    x.copy_(values)
    return x, values


@pytest.mark.parametrize("backend, device", [p for p in FUSED if p.values[1] == "cpu"])
def test_offsets_past_int32(backend, device):
    x, values = _strided_past_int32()
    for op in ("masked_mean", "masked_max", "masked_mean_max"):
        assert_close(getattr(fused_pool, op)(x, backend=backend), getattr(reference, op)(values))
    scores = torch.randn(1, 5, 3, generator=make_generator(4)).bfloat16()
    query = torch.randn(3, 1, generator=make_generator(5)).bfloat16()
    for op, other in (("attention_pool", scores), ("query_attention_pool", query)):
        out = getattr(fused_pool, op)(x, other, backend=backend)
        assert_close(out, getattr(reference, op)(values, other))


@pytest.mark.parametrize("backend, device", FUSED)
def test_varlen_argmax_is_an_index_within_the_sequence(backend, device):
    """Saved for backward: the winner's index within its sequence, which fits int32 whatever T is."""
    gen = make_generator(12)
    lengths = [4, 0, 9, 300]
    x = torch.randn(sum(lengths), 24, generator=gen).to(device)
    cu_seqlens = cu_seqlens_of(lengths, device=device)
    _, _, argmax = kernels(backend, "pool").forward(x, None, cu_seqlens, None, MAX)
    starts = cu_seqlens[:-1].tolist()
    for b, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        expected = x[start : start + length].argmax(0) if length else torch.full((24,), -1)
        assert torch.equal(argmax[b].cpu().long(), expected.cpu())


@pytest.mark.parametrize("kernel", ["attention_fwd_kernel", "attention_bwd_kernel", "wide_query"])
def test_scale_is_a_float64_kernel_argument(kernel):
    """Triton types a Python float argument float32: the query scale must be declared float64,
    or float64 scores are off by ~3e-8 relative on a GPU (the interpreter cannot show it)."""
    from fused_pool.triton_kernels import attention_kernels, wide_query

    jitted = (
        [wide_query.wide_query_fwd_kernel, wide_query.wide_query_bwd_kernel]
        if kernel == "wide_query"
        else [getattr(attention_kernels, kernel)]
    )
    for function in jitted:
        annotation = inspect.signature(function.fn).parameters["scale"].annotation
        assert annotation in ("tl.float64", tl.float64), (function.fn.__name__, annotation)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_run_on_the_inputs_gpu(backend):
    if backend not in fused_pool.available_backends():
        pytest.skip(f"{backend} backend not available")
    x = torch.randn(4, 33, 64, device="cuda:1", requires_grad=True)
    mask = torch.rand(4, 33, device="cuda:1") > 0.3
    query = torch.randn(64, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        for op, args in (("masked_mean_max", ()), ("query_attention_pool", (query,))):
            out = getattr(fused_pool, op)(x, *args, mask, backend=backend)
            out.sum().backward()
            assert out.device == torch.device("cuda:1")
            assert_close(out, getattr(reference, op)(x, *args, mask))
