"""Query attention pooling for heads wider than one register tile (head_dim > QUERY_MAX_BLOCK_D).

The narrow-head kernels (attention_kernels.py) hold a whole head in one (BLOCK_R, BLOCK_D) tile, so
that a row's score comes from the tile that is also summed. Past a few thousand channels that tile
no longer fits in registers (head_dim 8192 spilled up to 3.5 KB per thread). Here a program takes
one head and walks it in BLOCK_D slices, twice per row tile: the first walk computes the scores
x . q, the second (over the same rows, now in cache) folds p * x into the program's float32
accumulator row. That row lives in global memory and belongs to the program alone (its row of
`out`, or of the split partials), so no other program touches it; a barrier orders each walk's
stores before the next walk's loads. The backward walks twice too: s and g . (x - out) first,
then dx = p g + ds scale q and the program's own dquery partial row += ds scale x.

Same semantics, outputs and split partials as attention_kernels.py (its combine kernel merges
them); attention.py launches both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .softmax import online_softmax_step, score_grad, softmax_weight
from .split_plan import program_chunk, row_sequence

# Widest head slice one tile holds; query heads wider than this take the kernels below.
QUERY_MAX_BLOCK_D = 4096
# Their tile: BLOCK_R rows x BLOCK_D channels.
WIDE_BLOCK_D, WIDE_BLOCK_R, WIDE_NUM_WARPS = 1024, 8, 8


@triton.jit
def _fill_row(row_ptr, D, value, BLOCK_D: tl.constexpr):
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(row_ptr + d, tl.full([BLOCK_D], value, dtype=row_ptr.dtype.element_ty), mask=d < D)
    tl.debug_barrier()


@triton.jit
def _row_scores(x_rows, q_ptr, keep, D, stride_xh, ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """x_row . q over the head, BLOCK_D channels at a time (x_rows: the rows' head start)."""
    s = tl.zeros(keep.shape, dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_in = d < D
        x = tl.load(
            x_rows[:, None] + d.to(tl.int64)[None, :] * stride_xh, mask=keep[:, None] & d_in[None, :], other=0
        )
        q = tl.load(q_ptr + d, mask=d_in, other=0).to(ACC_DTYPE)
        s += tl.sum(x.to(ACC_DTYPE) * q[None, :], 1)
    return s


@triton.jit
def wide_query_fwd_kernel(
    x_ptr,
    query_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    out_ptr,
    stats_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    D,
    num_heads,
    scale: tl.float64,  # float64 also for float32 x: a Python float would be typed float32
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    chunk_rows,
    splits,
    search_iters,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    head_base = head.to(tl.int64) * D
    seq, _start, first, last = program_chunk(
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
    if SPLIT:
        acc_row = part_acc_ptr + pid.to(tl.int64) * H + head_base
    else:
        acc_row = out_ptr + seq.to(tl.int64) * H + head_base
    _fill_row(row_ptr=acc_row, D=D, value=0.0, BLOCK_D=BLOCK_D)
    x_seq = x_ptr + seq.to(tl.int64) * stride_xb + head_base * stride_xh
    m_seq = mask_ptr + seq.to(tl.int64) * stride_mb
    q_ptr = query_ptr + head_base
    row_max = tl.full([], float("-inf"), dtype=ACC_DTYPE)
    den = tl.zeros([], dtype=ACC_DTYPE)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        keep = rows < last
        if HAS_MASK:
            keep = keep & (tl.load(m_seq + rows * stride_mr, mask=keep, other=0) != 0)
        x_rows = x_seq + rows * stride_xr
        s = _row_scores(
            x_rows=x_rows,
            q_ptr=q_ptr,
            keep=keep,
            D=D,
            stride_xh=stride_xh,
            ACC_DTYPE=ACC_DTYPE,
            BLOCK_D=BLOCK_D,
        )
        s = (s * scale).to(ACC_DTYPE)
        s = tl.where(keep, s, float("-inf"))
        row_max, den, alpha, p = online_softmax_step(row_max=row_max, den=den, s=s)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            x_ptrs = x_rows[:, None] + d.to(tl.int64)[None, :] * stride_xh
            x = tl.load(x_ptrs, mask=keep[:, None] & d_in[None, :], other=0).to(ACC_DTYPE)
            acc = tl.load(acc_row + d, mask=d_in, other=0)
            tl.store(acc_row + d, acc * alpha + tl.sum(p[:, None] * x, 0), mask=d_in)
        tl.debug_barrier()
    if SPLIT:
        tl.store(part_m_ptr + pid * num_heads + head, row_max)
        tl.store(part_l_ptr + pid * num_heads + head, den)
    else:
        nonempty = den != 0  # l NaN (a NaN or +inf score): NaN
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            acc = tl.load(acc_row + d, mask=d < D, other=0)
            tl.store(acc_row + d, tl.where(nonempty, acc / tl.where(nonempty, den, 1), 0), mask=d < D)
        stats = stats_ptr + (seq.to(tl.int64) * num_heads + head) * 2
        tl.store(stats, row_max)
        tl.store(stats + 1, den)


@triton.jit
def wide_query_bwd_kernel(
    grad_ptr,
    x_ptr,
    query_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    stats_ptr,
    out_ptr,
    dx_ptr,
    dquery_part_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    D,
    num_heads,
    scale: tl.float64,
    rows_per_program,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    search_iters,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    head_base = head.to(tl.int64) * D
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    q_ptr = query_ptr + head_base
    dquery_row = dquery_part_ptr + pid.to(tl.int64) * H + head_base
    _fill_row(row_ptr=dquery_row, D=D, value=0.0, BLOCK_D=BLOCK_D)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        seq, position, _index, keep = row_sequence(
            tile_start=r0,
            rows=rows,
            cu_seqlens_ptr=cu_seqlens_ptr,
            num_seqs=num_seqs,
            seq_len=seq_len,
            num_rows=num_rows,
            search_iters=search_iters,
            VARLEN=VARLEN,
            ROWS_INT32=ROWS_INT32,
        )
        keep = keep & (rows < last)
        if HAS_MASK:
            m = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + position * stride_mr, mask=keep, other=0)
            keep = keep & (m != 0)
        seq64 = seq.to(tl.int64)
        x_rows = x_ptr + seq64 * stride_xb + position * stride_xr + head_base * stride_xh
        g_rows = grad_ptr + seq64 * H + head_base
        out_rows = out_ptr + seq64 * H + head_base
        stats = stats_ptr + (seq64 * num_heads + head) * 2
        row_max = tl.load(stats, mask=keep, other=0)
        den = tl.load(stats + 1, mask=keep, other=0)
        # First walk: the score and g . (x - out) of each row.
        s = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        g_dot_x_minus_out = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            tile_in = keep[:, None] & d_in[None, :]
            x = tl.load(x_rows[:, None] + d.to(tl.int64)[None, :] * stride_xh, mask=tile_in, other=0)
            x = x.to(ACC_DTYPE)
            g = tl.load(g_rows[:, None] + d[None, :], mask=tile_in, other=0)
            out = tl.load(out_rows[:, None] + d[None, :], mask=tile_in, other=0)
            q = tl.load(q_ptr + d, mask=d_in, other=0).to(ACC_DTYPE)
            s += tl.sum(x * q[None, :], 1)
            g_dot_x_minus_out += tl.sum(g * (x - out), 1)
        p = softmax_weight(s=(s * scale).to(ACC_DTYPE), row_max=row_max, den=den, keep=keep)
        ds_scaled = score_grad(p=p, g_dot_x_minus_out=g_dot_x_minus_out, scale=scale, den=den, keep=keep)
        # Second walk: dx, and this program's dquery partial.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            tile_in = keep[:, None] & d_in[None, :]
            x = tl.load(x_rows[:, None] + d.to(tl.int64)[None, :] * stride_xh, mask=tile_in, other=0)
            g = tl.load(g_rows[:, None] + d[None, :], mask=tile_in, other=0)
            q = tl.load(q_ptr + d, mask=d_in, other=0).to(ACC_DTYPE)
            dx = p[:, None] * g + ds_scaled[:, None] * q[None, :]
            dx_ptrs = dx_ptr + rows[:, None] * H + head_base + d[None, :]
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=(rows < last)[:, None] & d_in[None, :])
            dquery = tl.load(dquery_row + d, mask=d_in, other=0)
            tl.store(dquery_row + d, dquery + tl.sum(ds_scaled[:, None] * x.to(ACC_DTYPE), 0), mask=d_in)
        tl.debug_barrier()
