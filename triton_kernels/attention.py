"""Triton attention pooling: attention_pool (scores given) and query_attention_pool (scores
(x_head . query_head) * scale computed in the kernel), forward and backward, padded and varlen.

Head k of nh pools channels [k D, (k+1) D), D = H / nh, with softmax weights over its sequence.

Forward: a program takes a chunk of rows of one sequence, one head and BLOCK_D of the head's
channels (query mode: the whole head, so the score of a row comes from the same loaded tile as the
weighted sum) and runs an online softmax: float32 running max m, running sum l and a
(BLOCK_R, BLOCK_D) accumulator of p * x, rescaled when m grows. Padding and -inf scores give p = 0.
Chunks of long sequences write (m, l, acc) partials, merged in chunk order by
`_attention_combine_kernel` exactly as split softmax does (deterministic). Output: float32
out = acc / l (0 for an empty head) and the softmax statistics (m, l) per (sequence, head), all
that backward needs besides x. (m and l are kept apart rather than as one log-sum-exp: with
scores of 1e4 a float32 log-sum-exp has an ulp of 1e-3, and exp(s - lse) would lose 3 digits;
s - m is exact where it matters.)

Backward, per row: p = exp(s - m) / l (0 when l = 0); dx = p * g (+ ds * scale * q in query mode);
ds = p * g . (x - out) per head. (Subtracting before the dot product, rather than g . x - g . out,
keeps ds exact where it should be 0, e.g. a token that takes all the weight.)
A program takes a chunk of rows and one head; in query mode it also sums ds * scale * x over its
rows into a float32 partial of dquery, and the partials are summed in a fixed order afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import wide_query
from .segments import (
    TILE_REGISTERS,
    TILE_WARPS,
    accumulation_dtype,
    channel_block,
    check_padded_length,
    geometry,
    kernel_mask,
    launches_on_input_device,
    plan_split,
    program_chunk,
    resident_programs,
    row_sequence,
    rows_fit_int32,
    search_iters,
    sequence_chunks,
    tile_launch,
    triton_accumulator,
)
from .softmax import online_softmax_step, score_grad, softmax_weight


@triton.jit
def _head_channels(program, blocks_per_head, D, BLOCK_D: tl.constexpr):
    """Program `program` along the channel axis -> (head, block within the head, its channels, which
    of them exist)."""
    head = program // blocks_per_head
    d_block = program % blocks_per_head
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    return head, d_block, head.to(tl.int64) * D + offs_d, offs_d < D


@triton.jit
def _attention_fwd_kernel(
    x_ptr,
    scores_ptr,
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
    blocks_per_head,
    scale: tl.float64,  # float64 also for float32 x: a Python float would be typed float32
    stride_xb,
    stride_xr,
    stride_xh,
    stride_sb,
    stride_sr,
    stride_sh,
    stride_mb,
    stride_mr,
    chunk_rows,
    splits,
    search_iters,
    QUERY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head, d_block, channels, d_in = _head_channels(tl.program_id(1), blocks_per_head, D, BLOCK_D)
    seq, _start, first, last = program_chunk(
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
    x_seq = x_ptr + seq.to(tl.int64) * stride_xb
    s_seq = scores_ptr + seq.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
    m_seq = mask_ptr + seq.to(tl.int64) * stride_mb
    if QUERY:
        q = tl.load(query_ptr + channels, mask=d_in, other=0).to(ACC_DTYPE)
    row_max = tl.full([], float("-inf"), dtype=ACC_DTYPE)
    den = tl.zeros([], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC_DTYPE)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        keep = rows < last
        if HAS_MASK:
            keep = keep & (tl.load(m_seq + rows * stride_mr, mask=keep, other=0) != 0)
        tile_in = keep[:, None] & d_in[None, :]
        x = tl.load(x_seq + rows[:, None] * stride_xr + channels[None, :] * stride_xh, mask=tile_in, other=0)
        x = x.to(ACC_DTYPE)
        if QUERY:
            s = (tl.sum(x * q[None, :], 1) * scale).to(ACC_DTYPE)
        else:
            s = tl.load(s_seq + rows * stride_sr, mask=keep, other=0).to(ACC_DTYPE)
        s = tl.where(keep, s, float("-inf"))
        row_max, den, alpha, p = online_softmax_step(row_max, den, s)
        acc = acc * alpha + p[:, None] * x
    total = tl.sum(acc, 0)
    if SPLIT:
        tl.store(part_acc_ptr + pid.to(tl.int64) * H + channels, total, mask=d_in)
        tl.store(part_m_ptr + pid * num_heads + head, row_max, mask=d_block == 0)
        tl.store(part_l_ptr + pid * num_heads + head, den, mask=d_block == 0)
    else:
        _store_attention(
            out_ptr, stats_ptr, seq, head, d_block, channels, d_in, H, num_heads, total, row_max, den
        )


@triton.jit
def _store_attention(
    out_ptr, stats_ptr, seq, head, d_block, channels, d_in, H, num_heads, total, row_max, den
):
    """out = acc / l (0 for an empty head); stats[seq, head] = (m, l)."""
    nonempty = den != 0  # l NaN (a NaN or +inf score): NaN
    out = tl.where(nonempty, total / tl.where(nonempty, den, 1), 0)
    tl.store(out_ptr + seq.to(tl.int64) * H + channels, out, mask=d_in)
    stats = stats_ptr + (seq * num_heads + head) * 2
    tl.store(stats, row_max, mask=d_block == 0)
    tl.store(stats + 1, den, mask=d_block == 0)


@triton.jit
def _attention_combine_kernel(
    chunk_offsets_ptr,
    out_ptr,
    stats_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    H,
    D,
    num_heads,
    blocks_per_head,
    splits,
    num_chunks,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merges one sequence's (m, l, acc) chunk partials in chunk order, as split softmax does."""
    seq = tl.program_id(0)
    head, d_block, channels, d_in = _head_channels(tl.program_id(1), blocks_per_head, D, BLOCK_D)
    first, end = sequence_chunks(seq, chunk_offsets_ptr, splits, num_chunks, VARLEN)
    row_max = tl.full([], float("-inf"), dtype=ACC_DTYPE)
    den = tl.zeros([], dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    acc_offset = first.to(tl.int64) * H
    for c in range(first, end):
        chunk_max = tl.load(part_m_ptr + c * num_heads + head)
        new_max = tl.maximum(row_max, chunk_max)
        shift = tl.where(new_max == float("-inf"), 0, new_max)
        alpha = tl.exp(row_max - shift)
        beta = tl.exp(chunk_max - shift)
        den = den * alpha + tl.load(part_l_ptr + c * num_heads + head) * beta
        total = total * alpha + tl.load(part_acc_ptr + acc_offset + channels, mask=d_in, other=0) * beta
        row_max = new_max
        acc_offset += H
    _store_attention(
        out_ptr, stats_ptr, seq, head, d_block, channels, d_in, H, num_heads, total, row_max, den
    )


@triton.jit
def _attention_bwd_kernel(
    grad_ptr,
    x_ptr,
    scores_ptr,
    query_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    stats_ptr,
    out_ptr,
    dx_ptr,
    dscores_ptr,
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
    stride_sb,
    stride_sr,
    stride_sh,
    stride_mb,
    stride_mr,
    search_iters,
    QUERY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    head_base = head.to(tl.int64) * D  # int64: huge strides must not wrap
    offs_d = tl.arange(0, BLOCK_D)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    if QUERY:  # the whole head is one tile (BLOCK_D >= D)
        d_in = offs_d < D
        q = tl.load(query_ptr + head_base + offs_d, mask=d_in, other=0).to(ACC_DTYPE)
        dquery = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        seq, position, _index, keep = row_sequence(
            r0, rows, cu_seqlens_ptr, num_seqs, seq_len, num_rows, search_iters, VARLEN, ROWS_INT32
        )
        keep = keep & (rows < last)
        if HAS_MASK:
            m = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + position * stride_mr, mask=keep, other=0)
            keep = keep & (m != 0)
        seq64 = seq.to(tl.int64)
        x_rows = x_ptr + seq64 * stride_xb + position * stride_xr
        g_rows = grad_ptr + seq64 * H + head_base
        out_rows = out_ptr + seq64 * H + head_base
        dx_rows = dx_ptr + rows * H + head_base
        stats = stats_ptr + (seq * num_heads + head) * 2
        row_max = tl.load(stats, mask=keep, other=0)
        den = tl.load(stats + 1, mask=keep, other=0)
        if QUERY:
            tile_in = keep[:, None] & d_in[None, :]
            x = tl.load(x_rows[:, None] + (head_base + offs_d)[None, :] * stride_xh, mask=tile_in, other=0)
            x = x.to(ACC_DTYPE)
            g = tl.load(g_rows[:, None] + offs_d[None, :], mask=tile_in, other=0)
            out = tl.load(out_rows[:, None] + offs_d[None, :], mask=tile_in, other=0)
            s = (tl.sum(x * q[None, :], 1) * scale).to(ACC_DTYPE)
            p = softmax_weight(s, row_max, den, keep)
            ds_scaled = score_grad(p, tl.sum(g * (x - out), 1), scale, den, keep)
            dx = p[:, None] * g + ds_scaled[:, None] * q[None, :]
            out_in = (rows < last)[:, None] & d_in[None, :]
            tl.store(dx_rows[:, None] + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_in)
            dquery += tl.sum(ds_scaled[:, None] * x, 0)
        else:
            s = tl.load(
                scores_ptr + seq64 * stride_sb + position * stride_sr + head.to(tl.int64) * stride_sh,
                mask=keep,
                other=0,
            )
            p = softmax_weight(s.to(ACC_DTYPE), row_max, den, keep)
            g_dot_x_minus_out = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                tile_in = keep[:, None] & (d < D)[None, :]
                x = tl.load(x_rows[:, None] + (head_base + d)[None, :] * stride_xh, mask=tile_in, other=0)
                g = tl.load(g_rows[:, None] + d[None, :], mask=tile_in, other=0)
                out = tl.load(out_rows[:, None] + d[None, :], mask=tile_in, other=0)
                g_dot_x_minus_out += tl.sum(g * (x.to(ACC_DTYPE) - out), 1)
                out_in = (rows < last)[:, None] & (d < D)[None, :]
                tl.store(
                    dx_rows[:, None] + d[None, :], (p[:, None] * g).to(dx_ptr.dtype.element_ty), mask=out_in
                )
            ds = score_grad(p, g_dot_x_minus_out, 1.0, den, keep)
            tl.store(
                dscores_ptr + rows * num_heads + head, ds.to(dscores_ptr.dtype.element_ty), mask=rows < last
            )
    if QUERY:
        tl.store(dquery_part_ptr + pid.to(tl.int64) * H + head_base + offs_d, dquery, mask=d_in)


def _score_strides(scores, varlen):
    """(stride_b, stride_row, stride_head) of (B, L, nh) / (T, nh) scores."""
    return (0, *scores.stride()) if varlen else scores.stride()


def _is_wide(head_dim: int, query: bool) -> bool:
    """Query heads too wide for one tile take the kernels of wide_query.py."""
    return query and triton.next_power_of_2(head_dim) > wide_query.QUERY_MAX_BLOCK_D


def _blocks(head_dim: int, query: bool, backward: bool = False) -> tuple[int, int, dict]:
    """(BLOCK_D, BLOCK_R, launch options): query mode holds the whole head in one tile, unless it is
    wide; the attention-mode backward walks the head in blocks of at most 128 channels."""
    if _is_wide(head_dim, query):
        return wide_query.WIDE_BLOCK_D, wide_query.WIDE_BLOCK_R, dict(num_warps=wide_query.WIDE_NUM_WARPS)
    block_d = max(16, triton.next_power_of_2(head_dim)) if query else channel_block(head_dim)
    block_r = max(2, 4096 // block_d)
    if backward and not query:
        block_d = min(block_d, 128)
    # Query tiles of 2048+ channels, and the query backward's 1024 (it also holds the head's dquery
    # partial), need more than TILE_REGISTERS: registers as they need.
    large_head = query and (block_d >= 2048 or (backward and block_d >= 1024))
    return block_d, block_r, tile_launch(255 if large_head else TILE_REGISTERS)


@launches_on_input_device
def attention_forward(
    x: torch.Tensor,
    scores: torch.Tensor | None,
    query: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H) / (T, H); scores (B, L, nh) / (T, nh), or query (nh, D). Returns float32
    (B, H) out and (B, nh, 2) softmax statistics (m, l) (float64 for float64 x)."""
    varlen = cu_seqlens is not None
    is_query = query is not None
    num_heads = query.shape[0] if is_query else scores.shape[-1]
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    num_seqs, seq_len, num_rows, longest, x_strides = geometry(x, cu_seqlens, max_seqlen)
    acc = accumulation_dtype(x.dtype)
    out = torch.empty(num_seqs, hidden, dtype=acc, device=x.device)
    stats = torch.empty(num_seqs, num_heads, 2, dtype=acc, device=x.device)
    if num_seqs == 0 or hidden == 0:
        return out, stats.zero_()
    block_d, block_r, launch = _blocks(head_dim, is_query)
    wide = _is_wide(head_dim, is_query)
    blocks_per_head = 1 if wide else triton.cdiv(head_dim, block_d)  # wide: a program walks its head
    plan = plan_split(num_seqs, num_rows, longest, num_heads * blocks_per_head, block_r, x.device, cu_seqlens)
    parts = [
        torch.empty(plan.num_chunks if plan.split else 0, *shape, dtype=acc, device=x.device)
        for shape in ((num_heads,), (num_heads,), (hidden,))
    ]
    mask_view, mask_strides = kernel_mask(mask)
    offsets = plan.chunk_offsets if plan.chunk_offsets is not None else stats  # unused when padded
    acc_dtype = triton_accumulator(x.dtype)
    geometry_args = (num_seqs, seq_len, num_rows, hidden, head_dim, num_heads)
    pointers = (
        mask_view if mask is not None else x,
        cu_seqlens if varlen else x,
        offsets,
        out,
        stats,
        *parts,
    )
    plan_args = (plan.chunk_rows, plan.splits, plan.search_iters)
    flags = dict(HAS_MASK=mask is not None, VARLEN=varlen, SPLIT=plan.split, ACC_DTYPE=acc_dtype)
    if wide:
        wide_query.wide_query_fwd_kernel[(plan.num_chunks, num_heads)](
            x,
            query,
            *pointers,
            *geometry_args,
            scale,
            *x_strides,
            *mask_strides,
            *plan_args,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            **launch,
            **flags,
        )
        # The combine takes the head in channel blocks, as in attention mode.
        block_d = channel_block(head_dim)
        blocks_per_head = triton.cdiv(head_dim, block_d)
    else:
        _attention_fwd_kernel[(plan.num_chunks, num_heads * blocks_per_head)](
            x,
            scores if scores is not None else x,
            query if is_query else x,
            *pointers,
            *geometry_args,
            blocks_per_head,
            scale,
            *x_strides,
            *(_score_strides(scores, varlen) if scores is not None else (0, 0, 0)),
            *mask_strides,
            *plan_args,
            QUERY=is_query,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            **launch,
            **flags,
        )
    if plan.split:
        _attention_combine_kernel[(num_seqs, num_heads * blocks_per_head)](
            offsets,
            out,
            stats,
            *parts,
            hidden,
            head_dim,
            num_heads,
            blocks_per_head,
            plan.splits,
            plan.num_chunks,
            VARLEN=varlen,
            ACC_DTYPE=acc_dtype,
            BLOCK_D=block_d,
            num_warps=TILE_WARPS if block_d >= 2048 else 4,
        )
    return out, stats


def _rows_per_program(num_rows: int, num_heads: int, block_r: int, device: torch.device, query: bool) -> int:
    """Attention mode: one row tile per program. Query mode: enough rows per program that the
    dquery partials (one H-vector per program) stay small next to x."""
    if not query:
        return block_r
    share = triton.cdiv(num_rows * num_heads, 2 * resident_programs(device))
    return max(4 * block_r, triton.cdiv(share, block_r) * block_r)


@launches_on_input_device
def attention_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scores: torch.Tensor | None,
    query: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x (contiguous), dscores like scores (contiguous) or dquery like query)."""
    varlen = cu_seqlens is not None
    is_query = query is not None
    num_heads = stats.shape[1]
    hidden = x.shape[-1]
    head_dim = hidden // num_heads if num_heads else 0
    num_seqs, seq_len, num_rows, _, x_strides = geometry(x, cu_seqlens)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    other = query if is_query else scores
    if num_rows == 0 or hidden == 0 or num_seqs == 0:
        return dx.zero_(), torch.zeros(other.shape, dtype=other.dtype, device=other.device)
    if not varlen:
        check_padded_length(seq_len)
    grad_out = grad_out.to(out.dtype).contiguous()
    block_d, block_r, launch = _blocks(head_dim, is_query, backward=True)
    rows_per_program = _rows_per_program(num_rows, num_heads, block_r, x.device, is_query)
    num_programs = triton.cdiv(num_rows, rows_per_program)
    if is_query:
        dscores = stats  # unused
        dquery_parts = torch.empty(num_programs, hidden, dtype=out.dtype, device=x.device)
    else:
        dscores = torch.empty(scores.shape, dtype=scores.dtype, device=x.device)
        dquery_parts = stats  # unused
    mask_view, mask_strides = kernel_mask(mask)
    flags = dict(
        HAS_MASK=mask is not None,
        VARLEN=varlen,
        ROWS_INT32=rows_fit_int32(num_rows, block_r),
        ACC_DTYPE=triton_accumulator(out.dtype),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        **launch,
    )
    sizes = (num_seqs, seq_len, num_rows, hidden, head_dim, num_heads, scale, rows_per_program)
    mask_arg, cu_arg = mask_view if mask is not None else x, cu_seqlens if varlen else x
    if _is_wide(head_dim, is_query):
        wide_query.wide_query_bwd_kernel[(num_programs, num_heads)](
            grad_out,
            x,
            query,
            mask_arg,
            cu_arg,
            stats,
            out,
            dx,
            dquery_parts,
            *sizes,
            *x_strides,
            *mask_strides,
            search_iters(num_seqs),
            **flags,
        )
    else:
        _attention_bwd_kernel[(num_programs, num_heads)](
            grad_out,
            x,
            scores if scores is not None else x,
            query if is_query else x,
            mask_arg,
            cu_arg,
            stats,
            out,
            dx,
            dscores,
            dquery_parts,
            *sizes,
            *x_strides,
            *(_score_strides(scores, varlen) if scores is not None else (0, 0, 0)),
            *mask_strides,
            search_iters(num_seqs),
            QUERY=is_query,
            **flags,
        )
    if is_query:
        # Fixed-order sum of the per-program partials: deterministic, no atomics.
        return dx, dquery_parts.sum(0).view(query.shape).to(query.dtype)
    return dx, dscores
