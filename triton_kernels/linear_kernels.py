"""Triton kernels of linear_pool: pool(act(x W^T + b)) over each sequence's kept tokens without the
(tokens, N) projection; linear.py launches them.

Forward (`linear_fwd_kernel`): a program owns (a chunk of one sequence, BLOCK_N outputs). Per block
of BLOCK_M kept tokens it computes z = x W^T with tl.dot over H (float32 / float64 accumulator),
adds the bias, applies the activation and folds the tile into a (BLOCK_N,) state: the running max
and its first token, or the weighted sum. Short sequences write the result; chunks of long ones
write partials that pool_combine_kernel folds in chunk order.

The activations and their derivatives and the projection tile are shared with the backward kernels
(linear_bwd_kernels.py); the max folding and the stores are the pool's (reduction.py).
"""

import triton
import triton.language as tl

from .reduction import column_max, kept_rows, store_states, take_max
from .split_plan import program_chunk


@triton.jit
def _log1p_nonnegative(u):
    """log(1 + u) for u >= 0, accurate for small u: log(v) u / (v - 1) with v = 1 + u (Goldberg)."""
    v = 1 + u
    step = v - 1
    return tl.where(step == 0, u, tl.log(v) * (u / tl.where(step == 0, 1, step)))


@triton.jit
def _tanh(z):
    """tanh from expm1(-2|z|) (Kahan's expm1: (e - 1) y / log(e)), accurate near 0."""
    y = -2 * tl.abs(z)
    e = tl.exp(y)
    log_e = tl.log(e)
    exact = (log_e == 0) | (e == 0)
    expm1 = tl.where(log_e == 0, y, tl.where(e == 0, -1, (e - 1) * (y / tl.where(exact, 1, log_e))))
    t = -expm1 / (2 + expm1)
    return tl.where(z < 0, -t, t)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    """ACTIVATION: an index into contract.ACTIVATIONS (no module-level constexpr globals: see DESIGN)."""
    if ACTIVATION == 1:  # relu
        a = tl.where(z > 0, z, 0)
    elif ACTIVATION == 2:  # log1p_relu
        a = _log1p_nonnegative(tl.where(z > 0, z, 0))
    elif ACTIVATION == 3:  # log1p_log1p_relu
        a = _log1p_nonnegative(_log1p_nonnegative(tl.where(z > 0, z, 0)))
    elif ACTIVATION == 4:  # gelu
        a = 0.5 * z * (1 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 5:  # tanh
        a = _tanh(z)
    elif ACTIVATION == 6:  # silu
        a = z / (1 + tl.exp(-z))
    else:
        a = z
    return tl.where(z != z, z, a)  # NaN stays NaN (relu's comparisons would drop it)


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz, as torch's autograd of the same activation computes it. The relu family at NaN
    as torch's threshold_backward (which zeroes where z <= 0): relu'(NaN) = 1, and the log1p forms'
    derivatives are NaN there."""
    if ACTIVATION == 1:  # relu
        d = tl.where(z <= 0, 0.0, 1.0).to(z.dtype)
    elif ACTIVATION == 2:  # log1p_relu
        d = tl.where(z > 0, 1 / (1 + tl.where(z > 0, z, 0)), tl.where(z == z, 0, z))
    elif ACTIVATION == 3:  # log1p_log1p_relu
        r = tl.where(z > 0, z, 0)
        d = tl.where(z > 0, 1 / ((1 + _log1p_nonnegative(r)) * (1 + r)), tl.where(z == z, 0, z))
    elif ACTIVATION == 4:  # gelu
        d = 0.5 * (1 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 5:  # tanh
        t = _tanh(z)
        d = 1 - t * t
    elif ACTIVATION == 6:  # silu
        s = 1 / (1 + tl.exp(-z))
        d = s * (1 + z * (1 - s))
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d


@triton.jit
def dot_acc(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b. DOT "native": tl.dot (float32 operands in full float32, as torch's default matmul,
    no TF32); "float32": tl.dot of the operands converted to float32 (the interpreter, whose numpy has
    no bfloat16 matmul; the same products, exact in float32); "product": a broadcast product summed
    over K (float64, which tl.dot does not take everywhere)."""
    if DOT == "product":
        return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), 1)
    if DOT == "float32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc, input_precision="ieee")


@triton.jit
def project_tile(
    x_rows,
    rows_in,
    weight_ptr,
    offs_n,
    n_in,
    H,
    stride_xh,
    stride_wn,
    stride_wh,
    ACC_DTYPE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z (BLOCK_M, BLOCK_N) = x[rows] W[offs_n]^T; x_rows: the rows' pointers, rows not in rows_in
    are never read (their z is 0)."""
    z = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    w_cols = weight_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < H
        k_offsets = offs_k.to(tl.int64) * stride_xh
        x_tile = tl.load(x_rows[:, None] + k_offsets[None, :], mask=rows_in[:, None] & k_in[None, :], other=0)
        w_tile = tl.load(
            w_cols + offs_k.to(tl.int64)[:, None] * stride_wh, mask=k_in[:, None] & n_in[None, :], other=0
        )
        z = dot_acc(a=x_tile, b=w_tile, acc=z, DOT=DOT)
    return z


@triton.jit
def linear_fwd_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
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
    N,
    out_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_wn,
    stride_wh,
    stride_bias,
    stride_mb,
    stride_mr,
    chunk_rows,
    splits,
    search_iters,
    MAX: tl.constexpr,
    DIVIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_block = tl.program_id(1)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
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
    x_seq = x_ptr + seq.to(tl.int64) * stride_xb
    m_seq = mask_ptr + seq.to(tl.int64) * stride_mb
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_in, other=0).to(ACC_DTYPE)
    total = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    weight = tl.zeros([], dtype=ACC_DTYPE)
    best = tl.full([BLOCK_N], float("-inf"), dtype=ACC_DTYPE)
    best_row = tl.full([BLOCK_N], -1, dtype=tl.int32)
    for r0 in range(first, last, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        keep = rows < last
        keep, w = kept_rows(
            mask_ptrs=m_seq + rows * stride_mr,
            keep=keep,
            HAS_MASK=HAS_MASK,
            WEIGHTED=WEIGHTED,
            ACC_DTYPE=ACC_DTYPE,
        )
        z = project_tile(
            x_rows=x_seq + rows * stride_xr,
            rows_in=keep,
            weight_ptr=weight_ptr,
            offs_n=offs_n,
            n_in=n_in,
            H=H,
            stride_xh=stride_xh,
            stride_wn=stride_wn,
            stride_wh=stride_wh,
            ACC_DTYPE=ACC_DTYPE,
            DOT=DOT,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        if HAS_BIAS:
            z += bias[None, :]
        values = activate(z, ACTIVATION=ACTIVATION)
        valid = keep[:, None] & n_in[None, :]
        if MAX:
            index = (rows - start).to(tl.int32)
            block_best, block_row = column_max(values=values, rows=index[:, None], valid=valid)
            best, best_row = take_max(
                best=best, best_row=best_row, value=block_best, row=block_row, valid=block_row >= 0
            )
        else:
            total += tl.sum(tl.where(valid, values * w[:, None], 0), 0)
            weight += tl.sum(w, 0)
    store_states(
        results=(out_ptr, den_ptr, argmax_ptr),
        partials=(part_sum_ptr, part_den_ptr, part_max_ptr, part_row_ptr),
        states=(total, weight, best, best_row),
        chunk=pid,
        seq=seq,
        offs=offs_n,
        offs_in=n_in,
        width=N,
        out_stride=out_stride,
        col_block=n_block,
        MEAN=not MAX,
        MAX=MAX,
        STATES=not DIVIDE,
        SPLIT=SPLIT,
    )
