"""Triton kernels of masked mean, masked max and their concatenation (mean_max); pool.py launches
them.

Forward (`pool_fwd_kernel`): a program reduces a chunk of rows of one sequence over BLOCK_H
channels, reading each kept row once (padding is skipped by masked loads) into (BLOCK_R, BLOCK_H)
float32 accumulators that are reduced once at the end. A short sequence is one chunk and its
program writes the result; chunks of long sequences write float32 partials that
`pool_combine_kernel` folds in chunk order (deterministic, no atomics). mean_max fills both halves
of its output from the same loads.

Backward (`pool_bwd_kernel`): a program writes a (BLOCK_R, BLOCK_H) tile of dx, every row exactly
once: mean: dx = w * g / sum(w); max: dx = g where the row is the saved argmax, else 0.
"""

import triton
import triton.language as tl

from .reduction import column_max, kept_rows, store_states, take_max
from .split_plan import program_chunk, row_sequence, sequence_chunks


@triton.jit
def reduce_chunk(
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
        keep, w = kept_rows(
            mask_ptrs=m_seq + rows * stride_mr,
            keep=keep,
            HAS_MASK=HAS_MASK,
            WEIGHTED=WEIGHTED,
            ACC_DTYPE=ACC_DTYPE,
        )
        tile_in = keep[:, None] & h_in[None, :]
        v = tl.load(x_seq + rows[:, None] * stride_xr + h_offsets, mask=tile_in, other=0).to(ACC_DTYPE)
        if MEAN:
            total += v * w[:, None] if WEIGHTED else v
            weight += w
        if MAX:
            index = (rows - start).to(tl.int32)
            best, best_row = take_max(
                best=best, best_row=best_row, value=v, row=index[:, None], valid=tile_in
            )
    # Fold the BLOCK_R slots; slots saw their rows in increasing order, so the first maximal row
    # of a slot is its own; across slots take the smallest row (NaN first).
    chunk_max, chunk_row = column_max(values=best, rows=best_row, valid=best_row >= 0)
    return tl.sum(total, 0), tl.sum(weight, 0), chunk_max, chunk_row


@triton.jit
def pool_fwd_kernel(
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
        pid=pid,
        chunk_offsets_ptr=chunk_offsets_ptr,
        cu_seqlens_ptr=cu_seqlens_ptr,
        num_seqs=num_seqs,
        seq_len=seq_len,
        num_rows=num_rows,
        chunk_rows=chunk_rows,
        splits=splits,
        search_iters=search_iters,
        VARLEN=VARLEN,
        SPLIT=SPLIT,
    )
    states = reduce_chunk(
        x_ptr=x_ptr,
        mask_ptr=mask_ptr,
        seq=seq,
        start=start,
        first=first,
        last=last,
        offs_h=offs_h,
        h_in=h_in,
        stride_xb=stride_xb,
        stride_xr=stride_xr,
        stride_xh=stride_xh,
        stride_mb=stride_mb,
        stride_mr=stride_mr,
        MEAN=MEAN,
        MAX=MAX,
        HAS_MASK=HAS_MASK,
        WEIGHTED=WEIGHTED,
        ACC_DTYPE=ACC_DTYPE,
        BLOCK_R=BLOCK_R,
        BLOCK_H=BLOCK_H,
    )
    store_states(
        results=(out_ptr, den_ptr, argmax_ptr),
        partials=(part_sum_ptr, part_den_ptr, part_max_ptr, part_row_ptr),
        states=states,
        chunk=pid,
        seq=seq,
        offs=offs_h,
        offs_in=h_in,
        width=H,
        out_stride=out_stride,
        col_block=h_block,
        MEAN=MEAN,
        MAX=MAX,
        STATES=STATES,
        SPLIT=SPLIT,
    )


@triton.jit
def pool_combine_kernel(
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
    first, end = sequence_chunks(
        seq=seq, chunk_offsets_ptr=chunk_offsets_ptr, splits=splits, num_chunks=num_chunks, VARLEN=VARLEN
    )
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
            best, best_row = take_max(best=best, best_row=best_row, value=value, row=row, valid=row >= 0)
    # The pooled row: SPLIT=False writes no partials (`chunk` and the part pointers go unused).
    store_states(
        results=(out_ptr, den_ptr, argmax_ptr),
        partials=(part_sum_ptr, part_den_ptr, part_max_ptr, part_row_ptr),
        states=(total, weight, best, best_row),
        chunk=seq,
        seq=seq,
        offs=offs_h,
        offs_in=h_in,
        width=H,
        out_stride=out_stride,
        col_block=h_block,
        MEAN=MEAN,
        MAX=MAX,
        STATES=STATES,
        SPLIT=False,
    )


@triton.jit
def pool_bwd_kernel(
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
        tile_start=tile_start,
        rows=rows,
        cu_seqlens_ptr=cu_seqlens_ptr,
        num_seqs=num_seqs,
        seq_len=seq_len,
        num_rows=num_rows,
        search_iters=search_iters,
        VARLEN=VARLEN,
        ROWS_INT32=ROWS_INT32,
    )
    keep, w = kept_rows(
        mask_ptrs=mask_ptr + seq.to(tl.int64) * stride_mb + position * stride_mr,
        keep=keep,
        HAS_MASK=HAS_MASK,
        WEIGHTED=WEIGHTED,
        ACC_DTYPE=ACC_DTYPE,
    )
    tile_in = keep[:, None] & h_in[None, :]
    g_row = grad_ptr + seq.to(tl.int64)[:, None] * grad_stride + offs_h[None, :]
    dx = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC_DTYPE)
    if MEAN:
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
