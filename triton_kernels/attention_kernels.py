"""Triton kernels of attention pooling, scores given (attention_pool) or computed from a query
(query_attention_pool, scores (x_head . query_head) * scale); attention.py launches them, and
wide_query.py holds the query kernels for heads too wide for one tile.

Head k of nh pools channels [k D, (k+1) D), D = H / nh, with softmax weights over its sequence.

Forward (`attention_fwd_kernel`): a program takes a chunk of rows of one sequence, one head and
BLOCK_D of the head's channels (query mode: the whole head, so the score of a row comes from the
same loaded tile as the weighted sum) and runs an online softmax: float32 running max m, running
sum l and a (BLOCK_R, BLOCK_D) accumulator of p * x, rescaled when m grows. Padding and -inf scores
give p = 0. Chunks of long sequences write (m, l, acc) partials, merged in chunk order by
`attention_combine_kernel` exactly as split softmax does (deterministic). Output: float32
out = acc / l (0 for an empty head) and the softmax statistics (m, l) per (sequence, head), all
that backward needs besides x. (m and l are kept apart rather than as one log-sum-exp: with
scores of 1e4 a float32 log-sum-exp has an ulp of 1e-3, and exp(s - lse) would lose 3 digits;
s - m is exact where it matters.)

Backward (`attention_bwd_kernel`), per row: p = exp(s - m) / l (0 when l = 0); dx = p * g
(+ ds * scale * q in query mode); ds = p * g . (x - out) per head. (Subtracting before the dot
product, rather than g . x - g . out, keeps ds exact where it should be 0, e.g. a token that takes
all the weight.) A program takes a chunk of rows and one head; in query mode it also sums
ds * scale * x over its rows into a float32 partial of dquery, and the partials are summed in a
fixed order afterwards.
"""

import triton
import triton.language as tl

from .softmax import online_softmax_step, score_grad, softmax_weight
from .split_plan import program_chunk, row_sequence, sequence_chunks


@triton.jit
def _head_channels(program, blocks_per_head, D, BLOCK_D: tl.constexpr):
    """Program `program` along the channel axis -> (head, block within the head, its channels, which
    of them exist)."""
    head = program // blocks_per_head
    d_block = program % blocks_per_head
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    return head, d_block, head.to(tl.int64) * D + offs_d, offs_d < D


@triton.jit
def attention_fwd_kernel(
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
    head, d_block, channels, d_in = _head_channels(
        program=tl.program_id(1), blocks_per_head=blocks_per_head, D=D, BLOCK_D=BLOCK_D
    )
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
        row_max, den, alpha, p = online_softmax_step(row_max=row_max, den=den, s=s)
        acc = acc * alpha + p[:, None] * x
    total = tl.sum(acc, 0)
    if SPLIT:
        tl.store(part_acc_ptr + pid.to(tl.int64) * H + channels, total, mask=d_in)
        tl.store(part_m_ptr + pid * num_heads + head, row_max, mask=d_block == 0)
        tl.store(part_l_ptr + pid * num_heads + head, den, mask=d_block == 0)
    else:
        _store_attention(
            out_ptr=out_ptr,
            stats_ptr=stats_ptr,
            seq=seq,
            head=head,
            d_block=d_block,
            channels=channels,
            d_in=d_in,
            H=H,
            num_heads=num_heads,
            total=total,
            row_max=row_max,
            den=den,
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
def attention_combine_kernel(
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
    head, d_block, channels, d_in = _head_channels(
        program=tl.program_id(1), blocks_per_head=blocks_per_head, D=D, BLOCK_D=BLOCK_D
    )
    first, end = sequence_chunks(
        seq=seq, chunk_offsets_ptr=chunk_offsets_ptr, splits=splits, num_chunks=num_chunks, VARLEN=VARLEN
    )
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
        out_ptr=out_ptr,
        stats_ptr=stats_ptr,
        seq=seq,
        head=head,
        d_block=d_block,
        channels=channels,
        d_in=d_in,
        H=H,
        num_heads=num_heads,
        total=total,
        row_max=row_max,
        den=den,
    )


@triton.jit
def attention_bwd_kernel(
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
            p = softmax_weight(s=s, row_max=row_max, den=den, keep=keep)
            ds_scaled = score_grad(
                p=p, g_dot_x_minus_out=tl.sum(g * (x - out), 1), scale=scale, den=den, keep=keep
            )
            dx = p[:, None] * g + ds_scaled[:, None] * q[None, :]
            out_in = (rows < last)[:, None] & d_in[None, :]
            tl.store(dx_rows[:, None] + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_in)
            dquery += tl.sum(ds_scaled[:, None] * x, 0)
        else:
            # An empty head's tokens (l == 0) get zero gradients: not even a NaN x of theirs is read.
            keep = keep & (den != 0)
            s = tl.load(
                scores_ptr + seq64 * stride_sb + position * stride_sr + head.to(tl.int64) * stride_sh,
                mask=keep,
                other=0,
            )
            p = softmax_weight(s=s.to(ACC_DTYPE), row_max=row_max, den=den, keep=keep)
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
            ds = p * g_dot_x_minus_out
            tl.store(
                dscores_ptr + rows * num_heads + head, ds.to(dscores_ptr.dtype.element_ty), mask=rows < last
            )
    if QUERY:
        tl.store(dquery_part_ptr + pid.to(tl.int64) * H + head_base + offs_d, dquery, mask=d_in)
