"""The linear op kind on Triton: pool(act(x W^T + b)) over each sequence's kept tokens, forward and
backward, in the kind's spec signatures (`linear_fwd`, `linear_bwd`; fused_pool.specs). The kernels
are in linear_kernels.py (forward) and linear_bwd_kernels.py.

Nothing of (tokens, N) is ever allocated. The forward tiles (token block x N block) with tl.dot and
reduces in the epilogue; long sequences are split over programs (split_plan) and their partials
folded in chunk order by the pool's combine kernel. Saved for backward: the sum of weights (MEAN) and
the int32 argmax (MAX: the winning token's index within its sequence, -1 if empty). The max backward
works on the (B, N) winners only; sum / mean recompute the projection tile by tile, with float32
(float64) workspaces of dx's and dweight's sizes.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from ..contract import MAX, MEAN, accumulation_dtype
from .launch import (
    chunk_arguments,
    kernel_cu_seqlens,
    kernel_mask,
    launches_on_input_device,
    triton_accumulator,
)
from .linear_bwd_kernels import (
    linear_max_dweight_kernel,
    linear_max_dx_kernel,
    linear_max_dz_kernel,
    linear_sum_dweight_kernel,
    linear_sum_dx_kernel,
)
from .linear_kernels import linear_fwd_kernel
from .pool_kernels import pool_combine_kernel
from .split_plan import (
    PROGRAMS_PER_SM,
    check_padded_length,
    geometry,
    plan_split,
    resident_programs,
    rows_fit_int32,
    search_iters,
)


class Tiles(NamedTuple):
    """tl.dot tile (BLOCK_M tokens x BLOCK_N outputs x BLOCK_K of H), warps and register budget of a
    projection kernel. The budget (maxnreg) keeps ptxas from picking an occupancy tier itself and
    spilling a few bytes at its edge (128 / 168 registers), as launch.tile_launch does."""

    m: int
    n: int
    k: int
    warps: int
    registers: int = 255


def forward_tiles(dtype: torch.dtype) -> Tiles:
    """Sized so that every specialization compiles without spills for sm_80 / sm_90, also with H not a
    multiple of 16 (unvectorized loads): .ci/check_gpu_compile."""
    if dtype == torch.float64:  # no tl.dot: a broadcast product of BLOCK_M x BLOCK_N x BLOCK_K elements
        return Tiles(16, 16, 16, 4)
    if dtype == torch.float32:  # full-precision float32: an FMA dot whose operands live in registers
        return Tiles(32, 64, 16, 8)
    return Tiles(64, 128, 32, 8)


def backward_tiles(dtype: torch.dtype) -> Tiles:
    """The sum / mean backward keeps dz and a dot result live together: half the forward's N block."""
    if dtype == torch.float64:
        return Tiles(16, 16, 16, 4)
    if dtype == torch.float32:
        return Tiles(32, 32, 16, 8)
    return Tiles(64, 64, 32, 8)


# Gather tiles of the max backward (elementwise, 2048 / 4096 elements): outputs x H for dz and
# dweight, sorted entries x H for dx.
MAX_DZ_BLOCKS = (32, 64)
MAX_DWEIGHT_BLOCKS = (32, 128)
MAX_DX_BLOCKS = (32, 128)
# Largest dweight workspace of the sum / mean backward, in elements, that more chunks may take.
DWEIGHT_WORKSPACE = 1 << 24


def dot_kind(dtype: torch.dtype) -> str:
    """The DOT constexpr of linear_kernels.dot_acc."""
    if dtype == torch.float64:
        return "product"
    return "float32" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "native"


def _weighted(mask: torch.Tensor | None, mode: int) -> bool:
    """A floating mask weights sum / mean; max keeps w != 0."""
    return mask is not None and not mode & MAX and mask.is_floating_point()


def _projection(weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """The projection's launch arguments: W (N, H) and the bias (W as its placeholder)."""
    return dict(
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else weight,
        stride_wn=weight.stride(0),
        stride_wh=weight.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
    )


@launches_on_input_device
def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    mode: int,
    activation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, L, H) padded or (T, H) varlen, any strides; weight (N, H), bias (N,) or None; mode MAX,
    SUM or MEAN; activation: an index into contract.ACTIVATIONS. Returns (out (B, N) in x.dtype, sum
    of weights (B,) float32/64 if MEAN else empty, argmax (B, N) int32 if MAX else empty)."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    geo = geometry(x, cu_seqlens, max_seqlen)
    num_seqs = geo.num_seqs
    features = weight.shape[0]
    acc = accumulation_dtype(x.dtype)
    want_max, divide = bool(mode & MAX), bool(mode & MEAN)
    out = torch.empty(num_seqs, features, dtype=x.dtype, device=x.device)
    # Sums of weights per sequence: saved for MEAN's backward, the kernels' scratch for SUM.
    weights = torch.empty(0 if want_max else num_seqs, dtype=acc, device=x.device)
    den = weights if divide else weights.new_empty(0)
    argmax = torch.empty((num_seqs, features) if want_max else (0,), dtype=torch.int32, device=x.device)
    if num_seqs == 0 or features == 0:
        return out, den.zero_(), argmax

    tiles = forward_tiles(x.dtype)
    feature_blocks = triton.cdiv(features, tiles.n)
    plan = plan_split(num_seqs, geo.num_rows, geo.longest, feature_blocks, tiles.m, x.device, cu_seqlens)
    if plan.split:
        chunks = plan.num_chunks
        part_sum = torch.empty(0 if want_max else chunks, features, dtype=acc, device=x.device)
        part_den = torch.empty(0 if want_max else chunks, dtype=acc, device=x.device)
        part_max = torch.empty(chunks if want_max else 0, features, dtype=acc, device=x.device)
        part_row = torch.empty(chunks if want_max else 0, features, dtype=torch.int32, device=x.device)
    else:
        part_sum = part_den = part_max = part_row = out  # unused
    rows = chunk_arguments(x, mask, cu_seqlens, geo, plan)
    results = dict(out_ptr=out, den_ptr=weights, argmax_ptr=argmax, out_stride=out.stride(0))
    partials = dict(
        part_sum_ptr=part_sum, part_den_ptr=part_den, part_max_ptr=part_max, part_row_ptr=part_row
    )
    linear_fwd_kernel[(plan.num_chunks, feature_blocks)](
        **rows,
        **_projection(weight, bias),
        **results,
        **partials,
        H=x.shape[-1],
        N=features,
        MAX=want_max,
        DIVIDE=divide,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        WEIGHTED=_weighted(mask, mode),
        ACC_DTYPE=triton_accumulator(x.dtype),
        DOT=dot_kind(x.dtype),
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_K=tiles.k,
        num_warps=tiles.warps,
        maxnreg=tiles.registers,
    )
    if plan.split:
        # The pool's combine over N "channels": MAX folds (max, first row) in chunk order; the sum is
        # the mean's undivided state (STATES).
        pool_combine_kernel[(num_seqs, feature_blocks)](
            chunk_offsets_ptr=rows["chunk_offsets_ptr"],
            **results,
            **partials,
            H=features,
            splits=plan.splits,
            num_chunks=plan.num_chunks,
            MEAN=not want_max,
            MAX=want_max,
            STATES=not want_max and not divide,
            VARLEN=varlen,
            ACC_DTYPE=triton_accumulator(x.dtype),
            BLOCK_H=tiles.n,
            num_warps=4,
        )
    return out, den, argmax


@launches_on_input_device
def linear_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    den: torch.Tensor,
    argmax: torch.Tensor,
    mode: int,
    activation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x (contiguous), dweight (N, H) and dbias (N,) in weight's dtype; dbias also when bias
    is None). den and argmax: what linear_fwd returned."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    num_seqs, seq_len, num_rows, _, x_strides = geometry(x, cu_seqlens)
    features, hidden = weight.shape
    if not varlen:
        check_padded_length(seq_len)
    if num_rows == 0 or num_seqs == 0 or features == 0:
        return x.new_zeros(x.shape), weight.new_zeros(weight.shape), weight.new_zeros(features)
    grad_out = grad_out.contiguous()
    geo = dict(
        cu_seqlens_ptr=cu_seqlens if varlen else x,
        seq_len=seq_len,
        num_rows=num_rows,
        H=hidden,
        N=features,
        stride_xb=x_strides[0],
        stride_xr=x_strides[1],
        stride_xh=x_strides[2],
    )
    if mode & MAX:
        return _max_bwd(grad_out, x, weight, bias, cu_seqlens, argmax, activation, geo, num_seqs)
    return _sum_bwd(grad_out, x, weight, bias, mask, den, mode, activation, geo, num_seqs, varlen)


def _max_bwd(grad_out, x, weight, bias, cu_seqlens, argmax, activation, geo, num_seqs):
    features, hidden = weight.shape
    acc = accumulation_dtype(x.dtype)
    dz = torch.empty(num_seqs, features, dtype=acc, device=x.device)
    block_n, block_k = MAX_DZ_BLOCKS
    linear_max_dz_kernel[(num_seqs, triton.cdiv(features, block_n))](
        grad_ptr=grad_out,
        x_ptr=x,
        **_projection(weight, bias),
        argmax_ptr=argmax,
        dz_ptr=dz,
        grad_stride=grad_out.stride(0),
        **geo,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        VARLEN=cu_seqlens is not None,
        ACC_DTYPE=triton_accumulator(x.dtype),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    dweight = torch.empty(features, hidden, dtype=weight.dtype, device=x.device)
    dbias = torch.empty(features, dtype=weight.dtype, device=x.device)
    block_n, block_h = MAX_DWEIGHT_BLOCKS
    # At least one H block: its program 0 writes dbias, also when H = 0.
    linear_max_dweight_kernel[(triton.cdiv(features, block_n), max(1, triton.cdiv(hidden, block_h)))](
        x_ptr=x,
        argmax_ptr=argmax,
        dz_ptr=dz,
        dweight_ptr=dweight,
        dbias_ptr=dbias,
        num_seqs=num_seqs,
        **{k: v for k, v in geo.items() if k != "N"},
        N=features,
        VARLEN=cu_seqlens is not None,
        ACC_DTYPE=triton_accumulator(x.dtype),
        BLOCK_N=block_n,
        BLOCK_H=block_h,
        num_warps=4,
    )
    # dx: each token row sums W[n] dz[seq, n] over the (seq, n) it won. Group the winners by row with
    # a stable sort of their rows (flat index seq N + n, so n order within a row) and give each row
    # its range of sorted entries: O(B N + T) integers, no atomics.
    num_rows = geo["num_rows"]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if hidden == 0:
        return dx, dweight, dbias
    index = argmax.to(torch.int64)
    if cu_seqlens is None:
        starts = torch.arange(num_seqs, device=x.device) * geo["seq_len"]
    else:
        starts = cu_seqlens[:-1].to(torch.int64).clamp(0, num_rows)
        ends = torch.maximum(cu_seqlens[1:].to(torch.int64).clamp(max=num_rows), starts)
    rows = starts[:, None] + index
    found = index >= 0
    if cu_seqlens is not None:
        found &= rows < ends[:, None]
    keys = torch.where(found, rows, num_rows).flatten()  # no winner: after every row
    sorted_keys, order = torch.sort(keys, stable=True)
    all_rows = torch.arange(num_rows, device=x.device)
    first = torch.searchsorted(sorted_keys, all_rows)
    end = torch.searchsorted(sorted_keys, all_rows, right=True)
    block_e, block_h = MAX_DX_BLOCKS
    linear_max_dx_kernel[(num_rows, triton.cdiv(hidden, block_h))](
        weight_ptr=weight,
        dz_ptr=dz,
        order_ptr=order,
        first_ptr=first,
        end_ptr=end,
        dx_ptr=dx,
        H=hidden,
        N=features,
        stride_wn=weight.stride(0),
        stride_wh=weight.stride(1),
        ACC_DTYPE=triton_accumulator(x.dtype),
        BLOCK_E=block_e,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return dx, dweight, dbias


def _dweight_chunks(num_tiles: int, feature_blocks: int, features: int, hidden: int, device) -> int:
    """Chunks of token tiles for the sum / mean dweight: enough programs for about two per SM, within
    the workspace budget."""
    sms = max(1, resident_programs(device) // PROGRAMS_PER_SM)
    chunks = min(num_tiles, triton.cdiv(2 * sms, feature_blocks))
    return max(1, min(chunks, DWEIGHT_WORKSPACE // max(1, features * hidden)))


def _sum_bwd(grad_out, x, weight, bias, mask, den, mode, activation, geo, num_seqs, varlen):
    features, hidden = weight.shape
    num_rows = geo["num_rows"]
    acc = accumulation_dtype(x.dtype)
    tiles = backward_tiles(x.dtype)
    mask_view, (stride_mb, stride_mr) = kernel_mask(mask)
    num_tiles = triton.cdiv(num_rows, tiles.m)
    common = dict(
        grad_ptr=grad_out,
        x_ptr=x,
        **_projection(weight, bias),
        mask_ptr=mask_view if mask is not None else x,
        den_ptr=den if mode & MEAN else x,
        num_seqs=num_seqs,
        **geo,
        grad_stride=grad_out.stride(0),
        stride_mb=stride_mb,
        stride_mr=stride_mr,
        search_iters=search_iters(num_seqs),
        DIVIDE=bool(mode & MEAN),
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        WEIGHTED=_weighted(mask, mode),
        VARLEN=varlen,
        ROWS_INT32=rows_fit_int32(num_rows, tiles.m),
        ACC_DTYPE=triton_accumulator(x.dtype),
        DOT=dot_kind(x.dtype),
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_K=tiles.k,
        num_warps=tiles.warps,
        maxnreg=tiles.registers,
    )
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    workspace = dx if x.dtype == acc else torch.empty(num_rows, hidden, dtype=acc, device=x.device)
    linear_sum_dx_kernel[(num_tiles,)](workspace_ptr=workspace, dx_ptr=dx, **common)

    feature_blocks = triton.cdiv(features, tiles.n)
    chunks = _dweight_chunks(num_tiles, feature_blocks, features, hidden, x.device)
    tiles_per_chunk = triton.cdiv(num_tiles, chunks)
    chunks = triton.cdiv(num_tiles, tiles_per_chunk)  # every chunk has a tile: every partial written
    dweight_parts = torch.empty(chunks, features, hidden, dtype=acc, device=x.device)
    dbias_parts = torch.empty(chunks, features, dtype=acc, device=x.device)
    linear_sum_dweight_kernel[(feature_blocks, chunks)](
        dweight_ptr=dweight_parts, dbias_ptr=dbias_parts, tiles_per_chunk=tiles_per_chunk, **common
    )
    dweight = dweight_parts[0] if chunks == 1 else dweight_parts.sum(0)
    dbias = dbias_parts[0] if chunks == 1 else dbias_parts.sum(0)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype)
