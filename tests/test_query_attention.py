"""query_attention_pool (scores from a learned query): the fused backends against the reference
(outputs and the gradients of x and query, every layout, dtype, head count and fused backend, outputs
poisoned), the scale argument, query heads wider than one Triton register tile, the reference's own
semantics on hand-computed cases, non-monotone cu_seqlens on the extension's op. The tests that run
attention_pool and query_attention_pool on the same inputs are in test_attention.py; non-finite
scores, tokens and scales in test_attention_nonfinite.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ATTENTION_PADDED_SHAPES,
    DTYPES,
    EXTENSION_DEVICES,
    FUSED,
    HEADS,
    MASKS,
    check_attention,
    cu_seqlens_of,
    make_generator,
    make_mask,
    make_query,
    needs_extension,
    poison_padding,
    poisoned_allocations,
    stable_seed,
)

from fused_pool import reference

TRITON = [p for p in FUSED if p.values[0] == "triton"]
ops = torch.ops.fused_pool  # the extension's ops, called directly


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_heads", HEADS)
@pytest.mark.parametrize("shape", ATTENTION_PADDED_SHAPES, ids=str)
def test_query_attention_pool_padded(shape, num_heads, mask_kind, dtype, backend, device):
    gen = make_generator(stable_seed((shape, num_heads, mask_kind, "q")))
    batch, length, hidden = shape
    x = torch.randn(shape, generator=gen).to(device, dtype)
    mask = make_mask(mask_kind, batch, length, gen)
    mask = mask if mask is None else mask.to(device)
    query = make_query(hidden, num_heads, dtype, device, gen)
    check_attention("query_attention_pool", backend, poison_padding(x, mask), query, mask)


@pytest.mark.parametrize("backend, device", FUSED)
def test_scale_argument(backend, device):
    gen = make_generator(11)
    x = torch.randn(2, 20, 16, generator=gen).to(device)
    query = make_query(16, 2, torch.float32, device, gen)
    check_attention("query_attention_pool", backend, x, query, scale=0.3)


# --- query heads wider than one register tile: the Triton wide-head kernels -------------------------


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


# --- the reference on hand-computed cases ----------------------------------------------------------


def test_query_attention_pool():
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
    query = torch.tensor([0.0, math.sqrt(2.0) * math.log(2.0)])
    # scores (x . q) / sqrt(2) = [0, log 2] -> p = [1/3, 2/3]
    out = reference.query_attention_pool(x, query)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2 / 3]]))
    # Two heads of one channel, scale 1: head 0 scores [3 q0, 0], head 1 [0, q1].
    query = torch.tensor([[0.0], [math.log(3.0)]])
    out = reference.query_attention_pool(x, query, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[1.5, 3 / 4]]))


def test_query_attention_pool_varlen_matches_padded():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]])
    query = torch.tensor([0.5, -0.25])
    packed = reference.query_attention_pool(x, query, cu_seqlens=torch.tensor([0, 1, 3]))
    padded = reference.query_attention_pool(
        torch.stack([torch.cat([x[:1], x[:1] * 0]), x[1:]]), query, torch.tensor([[1, 0], [1, 1]])
    )
    torch.testing.assert_close(packed, padded)


# --- the extension's op called directly: malformed cu_seqlens give clamped segments ----------------


def _clamped_segments(cu, num_rows):
    bounds = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        start = min(max(start, 0), num_rows)
        bounds.append((start, min(max(end, start), num_rows)))
    return bounds


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_query_attention_non_monotone_cu_seqlens_cpu(device, x_dtype):
    """Every score the forward reads is computed: rows 4-9 of [0, 10, 2, 3, 4] belong to sequence 0
    although a binary search over cu_seqlens assigns them elsewhere."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=gen).to(x_dtype)
    query = torch.randn(2, 4, generator=gen)
    cu = torch.tensor([0, 10, 2, 3, 4], dtype=torch.int32)
    with poisoned_allocations():  # a score the kernels forget to write is NaN
        runs = [
            ops.ext_query_attention_fwd(x.to(device), query.to(device), None, cu.to(device), None, 0.7)
            for _ in "ab"
        ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    expected = torch.zeros(4, 8)
    for b, (start, end) in enumerate(_clamped_segments(cu, 20)):
        for head in range(2):
            rows = x[start:end, 4 * head : 4 * head + 4].float()
            if len(rows):
                p = torch.softmax(rows @ query[head] * 0.7, 0)
                expected[b, 4 * head : 4 * head + 4] = p @ rows
    torch.testing.assert_close(runs[0][0].cpu().float(), expected, atol=1e-5, rtol=1e-5)
