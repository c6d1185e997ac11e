"""Triton masked mean, masked max and their concatenation (mean_max), forward and backward.

Forward: a program reduces a chunk of rows of one sequence over BLOCK_H channels, reading each kept
row once (padding is skipped by masked loads) into (BLOCK_R, BLOCK_H) float32 accumulators that are
reduced once at the end. A short sequence is one chunk and its program writes the result; chunks of
long sequences write float32 partials that `_pool_combine_kernel` folds in chunk order
(deterministic, no atomics). mean_max fills both halves of its output from the same loads.

Backward: a program writes a (BLOCK_R, BLOCK_H) tile of dx, every row exactly once:
mean: dx = w * g / sum(w); max: dx = g where the row is the saved argmax, else 0.

Saved for backward: sum(w) per sequence (mean) and the int32 argmax per (sequence, channel) (max:
the index of the winning token within its sequence, l padded, t - start varlen, so it fits int32
whatever T is; -1 for an empty sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import MAX, MEAN, STATES, accumulation_dtype
from .segments import (
    channel_block,
    check_padded_length,
    geometry,
    kernel_mask,
    launches_on_input_device,
    plan_split,
    program_chunk,
    row_sequence,
    rows_fit_int32,
    search_iters,
    sequence_chunks,
    tile_launch,
    triton_accumulator,
)


@triton.jit
def _take_max(best, best_row, value, row, valid):
    """Running max with first-row tie-break; a NaN wins over numbers and the first NaN is kept."""
    best_nan = best != best
    take = valid & ((best_row < 0) | ((value != value) & ~best_nan) | (~best_nan & (value > best)))
    return tl.where(take, value, best), tl.where(take, row, best_row)


@triton.jit
def _reduce_chunk(
    x_ptr,
    mask_ptr,
    seq,
    start,
    first,
    last,
    offs_h,
    h_in,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rows [first, last) of sequence `seq`, which starts at row `start`: (weighted sum, sum of
    weights, max, argmax as an index within the sequence)."""
    x_seq = x_ptr + seq.to(tl.int64) * stride_xb
    m_seq = mask_ptr + seq.to(tl.int64) * stride_mb
    h_offsets = offs_h.to(tl.int64)[None, :] * stride_xh  # int64: huge strides must not wrap
    total = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC_DTYPE)
    weight = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    best = tl.full([BLOCK_R, BLOCK_H], float("-inf"), dtype=ACC_DTYPE)
    best_row = tl.full([BLOCK_R, BLOCK_H], -1, dtype=tl.int32)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        keep = rows < last
        if HAS_MASK:
            m = tl.load(m_seq + rows * stride_mr, mask=keep, other=0)
            keep = keep & (m != 0)
            w = tl.where(keep, m.to(ACC_DTYPE), 0) if WEIGHTED else keep.to(ACC_DTYPE)
        else:
            w = keep.to(ACC_DTYPE)
        tile_in = keep[:, None] & h_in[None, :]
        v = tl.load(x_seq + rows[:, None] * stride_xr + h_offsets, mask=tile_in, other=0).to(ACC_DTYPE)
        if MEAN:
            total += v * w[:, None] if WEIGHTED else v
            weight += w
        if MAX:
            index = (rows - start).to(tl.int32)
            best, best_row = _take_max(best, best_row, v, index[:, None], tile_in)
    # Fold the BLOCK_R slots; slots saw their rows in increasing order, so the first maximal row
    # of a slot is its own; across slots take the smallest row (NaN first).
    slot_nan = (best != best) & (best_row >= 0)
    nan_row = tl.min(tl.where(slot_nan, best_row, 2147483647), 0)
    numbers = tl.where(slot_nan | (best_row < 0), float("-inf"), best)
    top = tl.max(numbers, 0)
    top_row = tl.min(
        tl.where((best_row >= 0) & ~slot_nan & (numbers == top[None, :]), best_row, 2147483647), 0
    )
    has_nan = nan_row != 2147483647
    chunk_max = tl.where(has_nan, float("nan"), top)
    chunk_row = tl.where(has_nan, nan_row, tl.where(top_row != 2147483647, top_row, -1))
    return tl.sum(total, 0), tl.sum(weight, 0), chunk_max, chunk_row


@triton.jit
def _store_result(
    out_ptr,
    den_ptr,
    argmax_ptr,
    seq,
    offs_h,
    h_in,
    H,
    out_stride,
    h_block,
    total,
    weight,
    best,
    best_row,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    STATES: tl.constexpr,
):
    """Writes the pooled row of `seq`: mean = total / weight (0 if empty), max (0 if empty). STATES:
    the partial states instead, total undivided (out is float32 / float64)."""
    out_row = out_ptr + seq.to(tl.int64) * out_stride
    if MEAN:
        if STATES:
            mean = total
        else:
            nonzero = weight != 0
            mean = tl.where(nonzero, total / tl.where(nonzero, weight, 1), 0)
        tl.store(out_row + offs_h, mean.to(out_ptr.dtype.element_ty), mask=h_in)
        tl.store(den_ptr + seq, weight, mask=h_block == 0)
    if MAX:
        col = H if MEAN else 0
        tl.store(
            out_row + col + offs_h, tl.where(best_row >= 0, best, 0).to(out_ptr.dtype.element_ty), mask=h_in
        )
        tl.store(argmax_ptr + seq.to(tl.int64) * H + offs_h, best_row, mask=h_in)


@triton.jit
def _pool_fwd_kernel(
    x_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    out_ptr,
    den_ptr,
    argmax_ptr,
    part_sum_ptr,
    part_den_ptr,
    part_max_ptr,
    part_row_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    out_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    chunk_rows,
    splits,
    search_iters,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    STATES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    h_block = tl.program_id(1)
    offs_h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    seq, start, first, last = program_chunk(
        pid,
        chunk_offsets_ptr,
        cu_seqlens_ptr,
        num_seqs,
        seq_len,
        num_rows,
        chunk_rows,
        splits,
        search_iters,
        VARLEN,
        SPLIT,
    )
    total, weight, best, best_row = _reduce_chunk(
        x_ptr,
        mask_ptr,
        seq,
        start,
        first,
        last,
        offs_h,
        h_in,
        stride_xb,
        stride_xr,
        stride_xh,
        stride_mb,
        stride_mr,
        MEAN,
        MAX,
        HAS_MASK,
        WEIGHTED,
        ACC_DTYPE,
        BLOCK_R,
        BLOCK_H,
    )
    if SPLIT:
        part = pid.to(tl.int64) * H + offs_h
        if MEAN:
            tl.store(part_sum_ptr + part, total, mask=h_in)
            tl.store(part_den_ptr + pid, weight, mask=h_block == 0)
        if MAX:
            tl.store(part_max_ptr + part, best, mask=h_in)
            tl.store(part_row_ptr + part, best_row, mask=h_in)
    else:
        _store_result(
            out_ptr,
            den_ptr,
            argmax_ptr,
            seq,
            offs_h,
            h_in,
            H,
            out_stride,
            h_block,
            total,
            weight,
            best,
            best_row,
            MEAN,
            MAX,
            STATES,
        )


@triton.jit
def _pool_combine_kernel(
    chunk_offsets_ptr,
    out_ptr,
    den_ptr,
    argmax_ptr,
    part_sum_ptr,
    part_den_ptr,
    part_max_ptr,
    part_row_ptr,
    H,
    out_stride,
    splits,
    num_chunks,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    STATES: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Folds the partials of one sequence's chunks in chunk (= row) order."""
    seq = tl.program_id(0)
    h_block = tl.program_id(1)
    offs_h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    first, end = sequence_chunks(seq, chunk_offsets_ptr, splits, num_chunks, VARLEN)
    total = tl.zeros([BLOCK_H], dtype=ACC_DTYPE)
    weight = tl.zeros([], dtype=ACC_DTYPE)
    best = tl.full([BLOCK_H], float("-inf"), dtype=ACC_DTYPE)
    best_row = tl.full([BLOCK_H], -1, dtype=tl.int32)
    part_row_offset = first.to(tl.int64) * H
    for c in range(first, end):
        part = part_row_offset + offs_h
        part_row_offset += H
        if MEAN:
            total += tl.load(part_sum_ptr + part, mask=h_in, other=0)
            weight += tl.load(part_den_ptr + c)
        if MAX:
            row = tl.load(part_row_ptr + part, mask=h_in, other=-1)
            value = tl.load(part_max_ptr + part, mask=h_in, other=0)
            best, best_row = _take_max(best, best_row, value, row, row >= 0)
    _store_result(
        out_ptr,
        den_ptr,
        argmax_ptr,
        seq,
        offs_h,
        h_in,
        H,
        out_stride,
        h_block,
        total,
        weight,
        best,
        best_row,
        MEAN,
        MAX,
        STATES,
    )


@triton.jit
def _pool_bwd_kernel(
    grad_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    den_ptr,
    argmax_ptr,
    dx_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    grad_stride,
    stride_mb,
    stride_mr,
    search_iters,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tile_start = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows = tile_start + tl.arange(0, BLOCK_R)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    seq, position, index, keep = row_sequence(
        tile_start, rows, cu_seqlens_ptr, num_seqs, seq_len, num_rows, search_iters, VARLEN, ROWS_INT32
    )
    if HAS_MASK:
        m = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + position * stride_mr, mask=keep, other=0)
        keep = keep & (m != 0)
    tile_in = keep[:, None] & h_in[None, :]
    g_row = grad_ptr + seq.to(tl.int64)[:, None] * grad_stride + offs_h[None, :]
    dx = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC_DTYPE)
    if MEAN:
        w = tl.where(keep, m.to(ACC_DTYPE), 0) if WEIGHTED else keep.to(ACC_DTYPE)
        den = tl.load(den_ptr + seq, mask=keep, other=1)
        scale = tl.where(den != 0, w / tl.where(den != 0, den, 1), 0)
        dx += tl.load(g_row, mask=tile_in, other=0).to(ACC_DTYPE) * scale[:, None]
    if MAX:
        col = H if MEAN else 0
        winner = tl.load(argmax_ptr + seq.to(tl.int64)[:, None] * H + offs_h[None, :], mask=tile_in, other=-1)
        is_winner = tile_in & (winner == index.to(tl.int32)[:, None])
        dx += tl.load(g_row + col, mask=is_winner, other=0).to(ACC_DTYPE)
    out_in = (rows < num_rows)[:, None] & h_in[None, :]
    tl.store(dx_ptr + rows[:, None] * H + offs_h[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_in)


def _weighted(mask: torch.Tensor | None, mode: int) -> bool:
    """A floating mask weights the mean; every other use keeps w != 0."""
    return mask is not None and bool(mode & MEAN) and mask.is_floating_point()


def _rows_per_tile(block_h: int) -> int:
    return max(1, 4096 // block_h)


@launches_on_input_device
def pool_forward(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, L, H) padded or (T, H) varlen. Returns (out (B, H or 2H) in x.dtype (STATES: the
    partial states, float32/64), sum of weights (B,) float32/64 if mean else empty, argmax row (B, H)
    int32 if max else empty)."""
    varlen = cu_seqlens is not None
    hidden = x.shape[-1]
    num_seqs, seq_len, num_rows, longest, x_strides = geometry(x, cu_seqlens, max_seqlen)
    acc = accumulation_dtype(x.dtype)
    want_mean, want_max, states = bool(mode & MEAN), bool(mode & MAX), bool(mode & STATES)
    width = 2 * hidden if want_mean and want_max else hidden
    out = torch.empty(num_seqs, width, dtype=acc if states else x.dtype, device=x.device)
    den = torch.empty(num_seqs if want_mean else 0, dtype=acc, device=x.device)
    argmax = torch.empty((num_seqs, hidden) if want_max else (0,), dtype=torch.int32, device=x.device)
    if num_seqs == 0 or hidden == 0:
        return out, den.zero_(), argmax.fill_(-1)

    mask_view, mask_strides = kernel_mask(mask)
    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    channel_blocks = triton.cdiv(hidden, block_h)
    plan = plan_split(num_seqs, num_rows, longest, channel_blocks, block_r, x.device, cu_seqlens)
    if plan.split:
        part_sum = torch.empty(plan.num_chunks if want_mean else 0, hidden, dtype=acc, device=x.device)
        part_den = torch.empty(plan.num_chunks if want_mean else 0, dtype=acc, device=x.device)
        part_max = torch.empty(plan.num_chunks if want_max else 0, hidden, dtype=acc, device=x.device)
        part_row = torch.empty(plan.num_chunks if want_max else 0, hidden, dtype=torch.int32, device=x.device)
    else:
        part_sum = part_den = part_max = part_row = den  # unused
    flags = dict(
        MEAN=want_mean, MAX=want_max, STATES=states, VARLEN=varlen, ACC_DTYPE=triton_accumulator(x.dtype)
    )
    offsets = plan.chunk_offsets if plan.chunk_offsets is not None else out  # unused when padded
    _pool_fwd_kernel[(plan.num_chunks, channel_blocks)](
        x,
        mask_view if mask is not None else x,
        cu_seqlens if varlen else x,
        offsets,
        out,
        den,
        argmax,
        part_sum,
        part_den,
        part_max,
        part_row,
        num_seqs,
        seq_len,
        num_rows,
        hidden,
        out.stride(0),
        *x_strides,
        *mask_strides,
        plan.chunk_rows,
        plan.splits,
        plan.search_iters,
        HAS_MASK=mask is not None,
        WEIGHTED=_weighted(mask, mode),
        SPLIT=plan.split,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        **tile_launch(),
        **flags,
    )
    if plan.split:
        _pool_combine_kernel[(num_seqs, channel_blocks)](
            offsets,
            out,
            den,
            argmax,
            part_sum,
            part_den,
            part_max,
            part_row,
            hidden,
            out.stride(0),
            plan.splits,
            plan.num_chunks,
            BLOCK_H=block_h,
            num_warps=4,
            **flags,
        )
    return out, den, argmax


@launches_on_input_device
def pool_backward(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    den: torch.Tensor,
    argmax: torch.Tensor,
    x_shape: list[int],
    x_dtype: torch.dtype,
    mode: int,
) -> torch.Tensor:
    """dx of shape x_shape ((B, L, H) or (T, H)), contiguous, in x_dtype; every element written."""
    varlen = cu_seqlens is not None
    hidden = x_shape[-1]
    dx = torch.empty(x_shape, dtype=x_dtype, device=grad_out.device)
    num_rows = dx.numel() // hidden if hidden else 0
    num_seqs = cu_seqlens.shape[0] - 1 if varlen else x_shape[0]
    if num_rows == 0 or hidden == 0:
        return dx
    if num_seqs == 0:
        return dx.zero_()
    if not varlen:
        check_padded_length(x_shape[1])
    grad_out = grad_out.contiguous()
    mask_view, mask_strides = kernel_mask(mask)
    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    _pool_bwd_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_h))](
        grad_out,
        mask_view if mask is not None else grad_out,
        cu_seqlens if varlen else grad_out,
        den if mode & MEAN else grad_out,
        argmax if mode & MAX else grad_out,
        dx,
        num_seqs,
        0 if varlen else x_shape[1],
        num_rows,
        hidden,
        grad_out.stride(0),
        *mask_strides,
        search_iters(num_seqs),
        MEAN=bool(mode & MEAN),
        MAX=bool(mode & MAX),
        HAS_MASK=mask is not None,
        WEIGHTED=_weighted(mask, mode),
        VARLEN=varlen,
        ROWS_INT32=rows_fit_int32(num_rows, block_r),
        ACC_DTYPE=triton_accumulator(x_dtype),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        **tile_launch(),
    )
    return dx


# Temporary (branch house, until the triton branch lands): the launchers in the op kind's
# signatures (fused_pool.specs), the names fused_pool.ops calls.
def pool_fwd(x, mask, cu_seqlens, max_seqlen, mode):
    return pool_forward(x, mask, cu_seqlens, max_seqlen, mode)


def pool_bwd(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode):
    return pool_backward(grad_out, mask, cu_seqlens, den, argmax, list(x_shape), x_dtype, mode)
