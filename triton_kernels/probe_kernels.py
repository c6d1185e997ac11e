"""Triton kernels of probe attention pooling (probe_attention_pool); probe.py launches them.

P probes (P, H) each score every token over all H channels, s[p, t] = scale (probes[p] . x_t), and
pool the tokens with the softmax of their scores: out[b, p] = sum_t p[p, t] x_t.

Forward (`probe_fwd_kernel`): a program takes a chunk of rows of one sequence, BLOCK_P probes and
BLOCK_H output channels. Per tile of BLOCK_T tokens it computes the (BLOCK_T, BLOCK_P) scores with
`tl.dot` over all H in BLOCK_K slices, folds them into a per-probe online softmax (softmax.py: running
max m, sum l, the accumulator rescaled when m grows), and adds p^T x of its channels with a second
`tl.dot` to the (BLOCK_P, BLOCK_H) accumulator. Programs of other channel blocks recompute the
scores of the same rows (launched next to each other, they read x from L2, not memory). Chunks of
long sequences write (m, l, acc) partials that attention_combine_kernel merges in chunk order.

Backward (`probe_bwd_kernel`): a program takes a chunk of rows of one sequence, every probe and
BLOCK_H channels. Per token tile it recomputes the scores and g_p . x_t (one pass over H, two dots),
p = exp(s - m) / l from the saved stats, ds = p (g_p . x_t - g_p . out_p), and writes
dx_t = sum_p p g_p + scale ds probes_p for its channels (two dots over the probes). Its share of
dprobes, scale sum_t ds x_t, goes to a per-program partial that the launcher sums in a fixed order.

Dot operands are in x's dtype (probes, p and the gradient rounded to it for bf16 / fp16), products
accumulate in float32 (float64 for float64 x); float32 dots run as tf32x3 (float32 accuracy), or as
plain float32 in the backward of more than 16 probes (probe.py: registers).
"""

import triton
import triton.language as tl

from .softmax import online_softmax_step, score_grad, softmax_weight
from .split_plan import program_chunk, sequence_rows


@triton.jit
def _scores_and_grad_dots(
    x_rows,
    probes_ptr,
    grad_seq,
    keep,
    probe_idx,
    probe_in,
    H,
    stride_xh,
    WITH_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(x_t . probes_p, x_t . g_p) for a tile of rows and a block of probes, (BLOCK_T, BLOCK_P) each,
    over all H channels in BLOCK_K slices (the second only WITH_GRAD; else zeros). probes and the
    gradient are contiguous (P, H) in x's dtype; rows not kept read as 0."""
    offs_k = tl.arange(0, BLOCK_K)
    dots = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC_DTYPE)
    grad_dots = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC_DTYPE)
    probe_rows = probe_idx.to(tl.int64) * H
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_in = k < H
        x = tl.load(x_rows[:, None] + k[None, :] * stride_xh, mask=keep[:, None] & k_in[None, :], other=0)
        x = x.to(DOT_DTYPE)
        slice_in = k_in[:, None] & probe_in[None, :]
        probes_t = tl.load(probes_ptr + probe_rows[None, :] + k[:, None], mask=slice_in, other=0)
        dots = tl.dot(x, probes_t.to(DOT_DTYPE), acc=dots, input_precision=DOT_PRECISION)
        if WITH_GRAD:
            grad_t = tl.load(grad_seq + probe_rows[None, :] + k[:, None], mask=slice_in, other=0)
            grad_dots = tl.dot(x, grad_t.to(DOT_DTYPE), acc=grad_dots, input_precision=DOT_PRECISION)
    return dots, grad_dots


@triton.jit
def probe_fwd_kernel(
    x_ptr,
    probes_ptr,
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
    P,
    scale: tl.float64,  # float64 also for float32 x: a Python float would be typed float32
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    probe_blocks,
    channel_blocks,
    chunk_rows,
    splits,
    search_iters,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Programs of one chunk are adjacent (its probe and channel blocks read the same rows of x).
    pid = tl.program_id(0)
    blocks_per_chunk = probe_blocks * channel_blocks
    chunk = pid // blocks_per_chunk
    probe_block = (pid % blocks_per_chunk) // channel_blocks
    channel_block = pid % channel_blocks
    seq, _start, first, last = program_chunk(
        pid=chunk,
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
    probe_idx = probe_block * BLOCK_P + tl.arange(0, BLOCK_P)
    probe_in = probe_idx < P
    channels = channel_block * BLOCK_H + tl.arange(0, BLOCK_H)
    channel_in = channels < H
    x_seq = x_ptr + seq.to(tl.int64) * stride_xb
    row_max = tl.full([BLOCK_P], float("-inf"), dtype=ACC_DTYPE)
    den = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=ACC_DTYPE)
    for r0 in range(first, last, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T).to(tl.int64)
        keep = rows < last
        if HAS_MASK:
            m = tl.load(mask_ptr + seq.to(tl.int64) * stride_mb + rows * stride_mr, mask=keep, other=0)
            keep = keep & (m != 0)
        x_rows = x_seq + rows * stride_xr
        dots, _ = _scores_and_grad_dots(
            x_rows=x_rows,
            probes_ptr=probes_ptr,
            grad_seq=probes_ptr,
            keep=keep,
            probe_idx=probe_idx,
            probe_in=probe_in,
            H=H,
            stride_xh=stride_xh,
            WITH_GRAD=False,
            ACC_DTYPE=ACC_DTYPE,
            DOT_DTYPE=DOT_DTYPE,
            DOT_PRECISION=DOT_PRECISION,
            BLOCK_T=BLOCK_T,
            BLOCK_P=BLOCK_P,
            BLOCK_K=BLOCK_K,
        )
        s = tl.where(keep[:, None], (dots * scale).to(ACC_DTYPE), float("-inf"))
        row_max, den, alpha, p = online_softmax_step(row_max=row_max, den=den, s=s)
        x = tl.load(
            x_rows[:, None] + channels[None, :] * stride_xh, mask=keep[:, None] & channel_in[None, :], other=0
        )
        p_t = tl.trans(p.to(DOT_DTYPE))
        acc = tl.dot(p_t, x.to(DOT_DTYPE), acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
    block_in = probe_in[:, None] & channel_in[None, :]
    if SPLIT:
        # Partials as attention_combine_kernel reads them: (chunk, P, H), (chunk, P), (chunk, P).
        part = part_acc_ptr + (chunk.to(tl.int64) * P + probe_idx)[:, None] * H + channels[None, :]
        tl.store(part, acc, mask=block_in)
        if channel_block == 0:
            tl.store(part_m_ptr + chunk * P + probe_idx, row_max, mask=probe_in)
            tl.store(part_l_ptr + chunk * P + probe_idx, den, mask=probe_in)
    else:
        nonempty = den != 0  # l NaN (a NaN or +inf score): NaN
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, den, 1)[:, None], 0)
        seq_probe = seq.to(tl.int64) * P + probe_idx
        tl.store(out_ptr + seq_probe[:, None] * H + channels[None, :], out, mask=block_in)
        if channel_block == 0:
            tl.store(stats_ptr + seq_probe * 2, row_max, mask=probe_in)
            tl.store(stats_ptr + seq_probe * 2 + 1, den, mask=probe_in)


@triton.jit
def _zero_rows(dx_ptr, first, last, channels, channel_in, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx[first:last, channels] = 0."""
    for r0 in range(first, last, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T).to(tl.int64)
        zeros = tl.zeros([BLOCK_T, BLOCK_H], dtype=dx_ptr.dtype.element_ty)
        rows_in = (rows < last)[:, None] & channel_in[None, :]
        tl.store(dx_ptr + rows[:, None] * H + channels[None, :], zeros, mask=rows_in)


@triton.jit
def probe_bwd_kernel(
    grad_ptr,
    grad_dot_out_ptr,
    x_ptr,
    probes_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    stats_ptr,
    dx_ptr,
    dprobes_part_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    P,
    scale: tl.float64,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_mb,
    stride_mr,
    channel_blocks,
    chunk_rows,
    splits,
    search_iters,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad (B, P, H) and probes (P, H) contiguous in x's dtype; grad_dot_out (B, P) = g_p . out_p in
    the accumulation dtype; dx contiguous like x; dprobes partials (programs, P, H)."""
    pid = tl.program_id(0)
    chunk = pid // channel_blocks
    channel_block = pid % channel_blocks
    seq, start, first, last = program_chunk(
        pid=chunk,
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
    probe_idx = tl.arange(0, BLOCK_P)
    probe_in = probe_idx < P
    channels = channel_block * BLOCK_H + tl.arange(0, BLOCK_H)
    channel_in = channels < H
    seq64 = seq.to(tl.int64)
    seq_probe = seq64 * P + probe_idx
    # m, l and g . out of each probe; padding probes get l = 0: p = ds = 0.
    row_max = tl.load(stats_ptr + seq_probe * 2, mask=probe_in, other=0)[None, :]
    den = tl.load(stats_ptr + seq_probe * 2 + 1, mask=probe_in, other=0)[None, :]
    grad_dot_out = tl.load(grad_dot_out_ptr + seq_probe, mask=probe_in, other=0)[None, :]
    grad_seq = grad_ptr + seq64 * P * H
    # The probes' and the gradient's (P, BLOCK_H) blocks, read once for every token tile.
    block_in = probe_in[:, None] & channel_in[None, :]
    block = probe_idx[:, None].to(tl.int64) * H + channels[None, :]
    grad_block = tl.load(grad_seq + block, mask=block_in, other=0).to(DOT_DTYPE)
    probes_block = tl.load(probes_ptr + block, mask=block_in, other=0).to(DOT_DTYPE)
    dprobes = tl.zeros([BLOCK_P, BLOCK_H], dtype=ACC_DTYPE)
    x_seq = x_ptr + seq64 * stride_xb
    dx_dtype = dx_ptr.dtype.element_ty
    for r0 in range(first, last, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T).to(tl.int64)
        in_chunk = rows < last
        keep = in_chunk
        if HAS_MASK:
            m = tl.load(mask_ptr + seq64 * stride_mb + rows * stride_mr, mask=in_chunk, other=0)
            keep = keep & (m != 0)
        x_rows = x_seq + rows * stride_xr
        dots, grad_dots = _scores_and_grad_dots(
            x_rows=x_rows,
            probes_ptr=probes_ptr,
            grad_seq=grad_seq,
            keep=keep,
            probe_idx=probe_idx,
            probe_in=probe_in,
            H=H,
            stride_xh=stride_xh,
            WITH_GRAD=True,
            ACC_DTYPE=ACC_DTYPE,
            DOT_DTYPE=DOT_DTYPE,
            DOT_PRECISION=DOT_PRECISION,
            BLOCK_T=BLOCK_T,
            BLOCK_P=BLOCK_P,
            BLOCK_K=BLOCK_K,
        )
        s = (dots * scale).to(ACC_DTYPE)
        kept = keep[:, None] & probe_in[None, :]
        p = softmax_weight(s=s, row_max=row_max, den=den, keep=kept)
        ds_scaled = score_grad(
            p=p, g_dot_x_minus_out=grad_dots - grad_dot_out, scale=scale, den=den, keep=kept
        ).to(DOT_DTYPE)
        dx = tl.dot(p.to(DOT_DTYPE), grad_block, input_precision=DOT_PRECISION)
        dx = tl.dot(ds_scaled, probes_block, acc=dx, input_precision=DOT_PRECISION)
        dx = tl.where(keep[:, None], dx, 0)  # tokens not kept: 0 (even under a NaN gradient)
        dx_rows = dx_ptr + (seq64 * seq_len + rows) * H  # dx is contiguous; varlen: seq_len = 0
        rows_in = in_chunk[:, None] & channel_in[None, :]
        tl.store(dx_rows[:, None] + channels[None, :], dx.to(dx_dtype), mask=rows_in)
        x = tl.load(
            x_rows[:, None] + channels[None, :] * stride_xh, mask=keep[:, None] & channel_in[None, :], other=0
        )
        dprobes = tl.dot(tl.trans(ds_scaled), x.to(DOT_DTYPE), acc=dprobes, input_precision=DOT_PRECISION)
    tl.store(dprobes_part_ptr + chunk.to(tl.int64) * P * H + block, dprobes, mask=block_in)
    if VARLEN:
        # Rows outside every sequence (only with malformed cu_seqlens) get 0: the first chunk of
        # sequence b clears the rows between the end of b - 1 and its start, the last one the tail.
        if first == start:
            _prev_start, prev_end = sequence_rows(
                seq=tl.maximum(seq - 1, 0),
                cu_seqlens_ptr=cu_seqlens_ptr,
                seq_len=0,
                num_rows=num_rows,
                VARLEN=True,
            )
            _zero_rows(
                dx_ptr=dx_ptr,
                first=tl.where(seq > 0, prev_end, 0),
                last=start,
                channels=channels,
                channel_in=channel_in,
                H=H,
                BLOCK_T=BLOCK_T,
                BLOCK_H=BLOCK_H,
            )
            if seq == num_seqs - 1:
                _seq_start, end = sequence_rows(
                    seq=seq, cu_seqlens_ptr=cu_seqlens_ptr, seq_len=0, num_rows=num_rows, VARLEN=True
                )
                _zero_rows(
                    dx_ptr=dx_ptr,
                    first=end,
                    last=num_rows,
                    channels=channels,
                    channel_in=channel_in,
                    H=H,
                    BLOCK_T=BLOCK_T,
                    BLOCK_H=BLOCK_H,
                )
