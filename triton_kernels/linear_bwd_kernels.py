"""Triton kernels of linear_pool's backward; linear.py launches them (the forward, the activations
and the projection tile are in linear_kernels.py).

Max: dz = g act'(z) at the argmax token only (`linear_max_dz_kernel`, B N H work); dweight / dbias
sum the winning rows over the sequences in order (`linear_max_dweight_kernel`); each token row of dx
sums dz W[n] over the entries that picked it, grouped by the launcher's stable sort
(`linear_max_dx_kernel`). Sum / mean: the projection is recomputed tile by tile; each dx row is owned
by one program (`linear_sum_dx_kernel`), each dweight row block by one program per chunk of token
tiles (`linear_sum_dweight_kernel`, chunks summed by the launcher in order). No atomics.
"""

import triton
import triton.language as tl

from .linear_kernels import activation_grad, dot_acc, project_tile
from .reduction import kept_rows
from .split_plan import row_sequence, sequence_rows

# --- backward, max -----------------------------------------------------------------------------


@triton.jit
def _winner_rows(argmax_ptr, cu_seqlens_ptr, seq, offs_n, n_in, N, seq_len, num_rows, VARLEN: tl.constexpr):
    """The row (x's row index: l padded, t varlen) of each output's winning token, and whether it has
    one (argmax -1: an empty sequence; an index past the sequence is treated as none)."""
    start, end = sequence_rows(
        seq=seq, cu_seqlens_ptr=cu_seqlens_ptr, seq_len=seq_len, num_rows=num_rows, VARLEN=VARLEN
    )
    seq = seq + tl.zeros([], dtype=tl.int64)  # a loop counter in the interpreter: a Python int
    winner = tl.load(argmax_ptr + seq * N + offs_n, mask=n_in, other=-1).to(tl.int64)
    rows = start + winner
    found = n_in & (winner >= 0) & (rows < end)
    return rows, found


@triton.jit
def linear_max_dz_kernel(
    grad_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    cu_seqlens_ptr,
    argmax_ptr,
    dz_ptr,
    seq_len,
    num_rows,
    H,
    N,
    grad_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_wn,
    stride_wh,
    stride_bias,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dz[seq, n] = g act'(z) with z recomputed at the winning token (0 where there is none)."""
    seq = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    rows, found = _winner_rows(
        argmax_ptr=argmax_ptr,
        cu_seqlens_ptr=cu_seqlens_ptr,
        seq=seq,
        offs_n=offs_n,
        n_in=n_in,
        N=N,
        seq_len=seq_len,
        num_rows=num_rows,
        VARLEN=VARLEN,
    )
    x_rows = x_ptr + seq.to(tl.int64) * stride_xb + rows * stride_xr
    w_rows = weight_ptr + offs_n.to(tl.int64) * stride_wn
    z = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, H, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_in = offs_k < H
        x_tile = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xh, mask=found[:, None] & k_in[None, :])
        w_tile = tl.load(w_rows[:, None] + offs_k[None, :] * stride_wh, mask=found[:, None] & k_in[None, :])
        z += tl.sum(x_tile.to(ACC_DTYPE) * w_tile.to(ACC_DTYPE), 1)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_in, other=0).to(ACC_DTYPE)
    g = tl.load(grad_ptr + seq.to(tl.int64) * grad_stride + offs_n, mask=found, other=0).to(ACC_DTYPE)
    dz = tl.where(found, g * activation_grad(z, ACTIVATION=ACTIVATION), 0)
    tl.store(dz_ptr + seq.to(tl.int64) * N + offs_n, dz, mask=n_in)


@triton.jit
def linear_max_dweight_kernel(
    x_ptr,
    cu_seqlens_ptr,
    argmax_ptr,
    dz_ptr,
    dweight_ptr,
    dbias_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    N,
    stride_xb,
    stride_xr,
    stride_xh,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dweight[n, h] = sum over sequences, in order, of dz[seq, n] x[winner, h]; dbias = sum of dz."""
    n_block = tl.program_id(0)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_in = offs_n < N
    h_in = offs_h < H
    h_offsets = offs_h.to(tl.int64)[None, :] * stride_xh
    dweight = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC_DTYPE)
    dbias = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for seq in range(0, num_seqs):
        seq = seq + tl.zeros([], dtype=tl.int64)  # the interpreter's counter is a Python int
        rows, found = _winner_rows(
            argmax_ptr=argmax_ptr,
            cu_seqlens_ptr=cu_seqlens_ptr,
            seq=seq,
            offs_n=offs_n,
            n_in=n_in,
            N=N,
            seq_len=seq_len,
            num_rows=num_rows,
            VARLEN=VARLEN,
        )
        dz = tl.load(dz_ptr + seq.to(tl.int64) * N + offs_n, mask=found, other=0)
        x_rows = x_ptr + seq.to(tl.int64) * stride_xb + rows * stride_xr
        x_tile = tl.load(x_rows[:, None] + h_offsets, mask=found[:, None] & h_in[None, :], other=0)
        dweight += dz[:, None] * x_tile.to(ACC_DTYPE)
        dbias += dz
    out = offs_n.to(tl.int64)[:, None] * H + offs_h[None, :]
    tl.store(dweight_ptr + out, dweight.to(dweight_ptr.dtype.element_ty), mask=n_in[:, None] & h_in[None, :])
    if tl.program_id(1) == 0:
        tl.store(dbias_ptr + offs_n, dbias.to(dbias_ptr.dtype.element_ty), mask=n_in)


@triton.jit
def linear_max_dx_kernel(
    weight_ptr,
    dz_ptr,
    order_ptr,
    first_ptr,
    end_ptr,
    dx_ptr,
    H,
    N,
    stride_wn,
    stride_wh,
    ACC_DTYPE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dx[row] = sum of dz[seq, n] W[n] over the (seq, n) whose winner is this row: the entries
    [first[row], end[row]) of the launcher's stable sort (flat indices seq N + n, in n order)."""
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    h_offsets = offs_h.to(tl.int64)[None, :] * stride_wh
    first = tl.load(first_ptr + row)
    end = tl.load(end_ptr + row)
    dx = tl.zeros([BLOCK_E, BLOCK_H], dtype=ACC_DTYPE)
    for e0 in range(first, end, BLOCK_E):
        entries = e0 + tl.arange(0, BLOCK_E)
        e_in = entries < end
        flat = tl.load(order_ptr + entries, mask=e_in, other=0)
        dz = tl.load(dz_ptr + flat, mask=e_in, other=0)
        n = flat % N
        w_tile = tl.load(
            weight_ptr + n[:, None] * stride_wn + h_offsets, mask=e_in[:, None] & h_in[None, :], other=0
        )
        dx += dz[:, None] * w_tile.to(ACC_DTYPE)
    tl.store(dx_ptr + row * H + offs_h, tl.sum(dx, 0).to(dx_ptr.dtype.element_ty), mask=h_in)


# --- backward, sum / mean --------------------------------------------------------------------------


@triton.jit
def _grad_tile(
    tile,
    n0,
    grad_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    den_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    N,
    grad_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_wn,
    stride_wh,
    stride_bias,
    stride_mb,
    stride_mr,
    search_iters,
    DIVIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For rows [tile BLOCK_M, +BLOCK_M) of x (global: b L + l padded, t varlen) and outputs
    [n0, n0 + BLOCK_N): dz = g[seq] s act'(z), s = w (sum) or w / den[seq] (mean; 0 if den is 0),
    0 at rows not kept. Also returns the rows' pointers into x, which rows are kept, offs_n, n_in."""
    tile_start = (tile + tl.zeros([], dtype=tl.int64)) * BLOCK_M  # tile: maybe the interpreter's int
    rows = tile_start + tl.arange(0, BLOCK_M)
    seq, position, _, keep = row_sequence(
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
    seq = seq.to(tl.int64)
    keep, s = kept_rows(
        mask_ptrs=mask_ptr + seq * stride_mb + position * stride_mr,
        keep=keep,
        HAS_MASK=HAS_MASK,
        WEIGHTED=WEIGHTED,
        ACC_DTYPE=ACC_DTYPE,
    )
    if DIVIDE:
        den = tl.load(den_ptr + seq, mask=keep, other=1)
        s = tl.where(den != 0, s / tl.where(den != 0, den, 1), 0)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    x_rows = x_ptr + seq * stride_xb + position * stride_xr
    z = project_tile(
        x_rows=x_rows,
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
        z += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_in, other=0).to(ACC_DTYPE)[None, :]
    valid = keep[:, None] & n_in[None, :]
    g = tl.load(grad_ptr + seq[:, None] * grad_stride + offs_n[None, :], mask=valid, other=0).to(ACC_DTYPE)
    dz = tl.where(valid, g * s[:, None] * activation_grad(z, ACTIVATION=ACTIVATION), 0)
    return dz, x_rows, keep, offs_n, n_in


@triton.jit
def linear_sum_dx_kernel(
    grad_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    den_ptr,
    workspace_ptr,
    dx_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    N,
    grad_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_wn,
    stride_wh,
    stride_bias,
    stride_mb,
    stride_mr,
    search_iters,
    DIVIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx rows [tile BLOCK_M, +BLOCK_M) (contiguous (rows, H)) = sum over output blocks of dz W, kept
    in the workspace (rows, H) in the accumulation dtype between blocks; the last block writes dx."""
    tile = tl.program_id(0)
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows < num_rows
    for n0 in range(0, N, BLOCK_N):
        dz, _, _, offs_n, n_in = _grad_tile(
            tile=tile,
            n0=n0,
            grad_ptr=grad_ptr,
            x_ptr=x_ptr,
            weight_ptr=weight_ptr,
            bias_ptr=bias_ptr,
            mask_ptr=mask_ptr,
            cu_seqlens_ptr=cu_seqlens_ptr,
            den_ptr=den_ptr,
            num_seqs=num_seqs,
            seq_len=seq_len,
            num_rows=num_rows,
            H=H,
            N=N,
            grad_stride=grad_stride,
            stride_xb=stride_xb,
            stride_xr=stride_xr,
            stride_xh=stride_xh,
            stride_wn=stride_wn,
            stride_wh=stride_wh,
            stride_bias=stride_bias,
            stride_mb=stride_mb,
            stride_mr=stride_mr,
            search_iters=search_iters,
            DIVIDE=DIVIDE,
            ACTIVATION=ACTIVATION,
            HAS_BIAS=HAS_BIAS,
            HAS_MASK=HAS_MASK,
            WEIGHTED=WEIGHTED,
            VARLEN=VARLEN,
            ROWS_INT32=ROWS_INT32,
            ACC_DTYPE=ACC_DTYPE,
            DOT=DOT,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        dz = dz.to(x_ptr.dtype.element_ty)  # the dot's operand type (as autograd's own dz in x's dtype)
        w_rows = weight_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < H
            w_tile = tl.load(
                w_rows + offs_k.to(tl.int64)[None, :] * stride_wh, mask=n_in[:, None] & k_in[None, :], other=0
            )
            out = rows[:, None] * H + offs_k[None, :]
            out_in = rows_in[:, None] & k_in[None, :]
            # Block conditions as (BLOCK_K,) vectors: the interpreter takes no scalar masks, and
            # Triton 3.6 does not compile an if / else around this dot for sm_90.
            n_start = offs_k * 0 + n0
            partial = tl.load(workspace_ptr + out, mask=out_in & (n_start > 0)[None, :], other=0)
            partial = dot_acc(a=dz, b=w_tile, acc=partial, DOT=DOT)
            last = (n_start + BLOCK_N >= N)[None, :]
            tl.store(workspace_ptr + out, partial, mask=out_in & ~last)
            tl.store(dx_ptr + out, partial.to(dx_ptr.dtype.element_ty), mask=out_in & last)


@triton.jit
def linear_sum_dweight_kernel(
    grad_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    den_ptr,
    dweight_ptr,
    dbias_ptr,
    num_seqs,
    seq_len,
    num_rows,
    H,
    N,
    grad_stride,
    stride_xb,
    stride_xr,
    stride_xh,
    stride_wn,
    stride_wh,
    stride_bias,
    stride_mb,
    stride_mr,
    search_iters,
    tiles_per_chunk,
    DIVIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Chunk c's part of dweight[n block] (dweight_ptr: (chunks, N, H) in the accumulation dtype) =
    sum over its row tiles, in order, of dz^T x; dbias_ptr (chunks, N): sum of dz."""
    offs_n0 = tl.program_id(0) * BLOCK_N
    chunk = tl.program_id(1)
    first_tile = chunk * tiles_per_chunk
    end_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(num_rows, BLOCK_M))
    dweight_chunk = dweight_ptr + chunk.to(tl.int64) * N * H
    dbias = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for tile in range(first_tile, end_tile):
        dz, x_rows, keep, offs_n, n_in = _grad_tile(
            tile=tile,
            n0=offs_n0,
            grad_ptr=grad_ptr,
            x_ptr=x_ptr,
            weight_ptr=weight_ptr,
            bias_ptr=bias_ptr,
            mask_ptr=mask_ptr,
            cu_seqlens_ptr=cu_seqlens_ptr,
            den_ptr=den_ptr,
            num_seqs=num_seqs,
            seq_len=seq_len,
            num_rows=num_rows,
            H=H,
            N=N,
            grad_stride=grad_stride,
            stride_xb=stride_xb,
            stride_xr=stride_xr,
            stride_xh=stride_xh,
            stride_wn=stride_wn,
            stride_wh=stride_wh,
            stride_bias=stride_bias,
            stride_mb=stride_mb,
            stride_mr=stride_mr,
            search_iters=search_iters,
            DIVIDE=DIVIDE,
            ACTIVATION=ACTIVATION,
            HAS_BIAS=HAS_BIAS,
            HAS_MASK=HAS_MASK,
            WEIGHTED=WEIGHTED,
            VARLEN=VARLEN,
            ROWS_INT32=ROWS_INT32,
            ACC_DTYPE=ACC_DTYPE,
            DOT=DOT,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        dbias += tl.sum(dz, 0)
        dz_t = tl.trans(dz.to(x_ptr.dtype.element_ty))
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < H
            x_tile = tl.load(
                x_rows[:, None] + offs_k.to(tl.int64)[None, :] * stride_xh,
                mask=keep[:, None] & k_in[None, :],
                other=0,
            )
            out = dweight_chunk + offs_n.to(tl.int64)[:, None] * H + offs_k[None, :]
            out_in = n_in[:, None] & k_in[None, :]
            if tile > first_tile:
                partial = tl.load(out, mask=out_in, other=0)
            else:
                partial = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC_DTYPE)
            partial = dot_acc(a=dz_t, b=x_tile, acc=partial, DOT=DOT)
            tl.store(out, partial, mask=out_in)
    tl.store(
        dbias_ptr + chunk.to(tl.int64) * N + offs_n0 + tl.arange(0, BLOCK_N),
        dbias,
        mask=offs_n0 + tl.arange(0, BLOCK_N) < N,
    )
