"""The pool op kind on Triton: masked mean, masked max and mean_max, forward and backward, in the
kind's spec signatures (`pool_fwd`, `pool_bwd`; fused_pool.specs). The kernels are in
pool_kernels.py.

Saved for backward: sum(w) per sequence (mean) and the int32 argmax per (sequence, channel) (max:
the index of the winning token within its sequence, l padded, t - start varlen, so it fits int32
whatever T is; -1 for an empty sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from ..contract import MAX, MEAN, STATES, accumulation_dtype
from .launch import (
    channel_block,
    chunk_arguments,
    kernel_cu_seqlens,
    kernel_mask,
    launches_on_input_device,
    tile_launch,
    triton_accumulator,
)
from .pool_kernels import pool_bwd_kernel, pool_combine_kernel, pool_fwd_kernel
from .split_plan import check_padded_length, geometry, plan_split, rows_fit_int32, search_iters


def _weighted(mask: torch.Tensor | None, mode: int) -> bool:
    """A floating mask weights the mean; every other use keeps w != 0."""
    return mask is not None and bool(mode & MEAN) and mask.is_floating_point()


def _rows_per_tile(block_h: int) -> int:
    return max(1, 4096 // block_h)


@launches_on_input_device
def pool_fwd(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, L, H) padded or (T, H) varlen; mode: MEAN and / or MAX bits, maybe STATES. Returns
    (out (B, H or 2H) in x.dtype (STATES: the partial states, float32/64), sum of weights (B,)
    float32/64 if mean else empty, argmax row (B, H) int32 if max else empty)."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    hidden = x.shape[-1]
    geo = geometry(x, cu_seqlens, max_seqlen)
    num_seqs = geo.num_seqs
    acc = accumulation_dtype(x.dtype)
    want_mean, want_max, states = bool(mode & MEAN), bool(mode & MAX), bool(mode & STATES)
    width = 2 * hidden if want_mean and want_max else hidden
    out = torch.empty(num_seqs, width, dtype=acc if states else x.dtype, device=x.device)
    den = torch.empty(num_seqs if want_mean else 0, dtype=acc, device=x.device)
    argmax = torch.empty((num_seqs, hidden) if want_max else (0,), dtype=torch.int32, device=x.device)
    if num_seqs == 0 or hidden == 0:
        return out, den.zero_(), argmax.fill_(-1)

    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    channel_blocks = triton.cdiv(hidden, block_h)
    plan = plan_split(num_seqs, geo.num_rows, geo.longest, channel_blocks, block_r, x.device, cu_seqlens)
    if plan.split:
        part_sum = torch.empty(plan.num_chunks if want_mean else 0, hidden, dtype=acc, device=x.device)
        part_den = torch.empty(plan.num_chunks if want_mean else 0, dtype=acc, device=x.device)
        part_max = torch.empty(plan.num_chunks if want_max else 0, hidden, dtype=acc, device=x.device)
        part_row = torch.empty(plan.num_chunks if want_max else 0, hidden, dtype=torch.int32, device=x.device)
    else:
        part_sum = part_den = part_max = part_row = den  # unused
    flags = dict(MEAN=want_mean, MAX=want_max, STATES=states, ACC_DTYPE=triton_accumulator(x.dtype))
    rows = chunk_arguments(x, mask, cu_seqlens, geo, plan)
    results = dict(out_ptr=out, den_ptr=den, argmax_ptr=argmax, out_stride=out.stride(0))
    partials = dict(
        part_sum_ptr=part_sum, part_den_ptr=part_den, part_max_ptr=part_max, part_row_ptr=part_row
    )
    pool_fwd_kernel[(plan.num_chunks, channel_blocks)](
        **rows,
        **results,
        **partials,
        H=hidden,
        WEIGHTED=_weighted(mask, mode),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        **tile_launch(),
        **flags,
    )
    if plan.split:
        pool_combine_kernel[(num_seqs, channel_blocks)](
            chunk_offsets_ptr=rows["chunk_offsets_ptr"],
            **results,
            **partials,
            H=hidden,
            splits=plan.splits,
            num_chunks=plan.num_chunks,
            VARLEN=varlen,
            BLOCK_H=block_h,
            num_warps=4,
            **flags,
        )
    return out, den, argmax


@launches_on_input_device
def pool_bwd(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    den: torch.Tensor,
    argmax: torch.Tensor,
    x_shape: Sequence[int],
    x_dtype: torch.dtype,
    mode: int,
) -> torch.Tensor:
    """dx of shape x_shape ((B, L, H) or (T, H); ints or SymInts), contiguous, in x_dtype; every
    element written. den and argmax: what pool_fwd returned."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    x_shape = list(x_shape)
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
    mask_view, (stride_mb, stride_mr) = kernel_mask(mask)
    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    pool_bwd_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_h))](
        grad_ptr=grad_out,
        mask_ptr=mask_view if mask is not None else grad_out,
        cu_seqlens_ptr=cu_seqlens if varlen else grad_out,
        den_ptr=den if mode & MEAN else grad_out,
        argmax_ptr=argmax if mode & MAX else grad_out,
        dx_ptr=dx,
        num_seqs=num_seqs,
        seq_len=0 if varlen else x_shape[1],
        num_rows=num_rows,
        H=hidden,
        grad_stride=grad_out.stride(0),
        stride_mb=stride_mb,
        stride_mr=stride_mr,
        search_iters=search_iters(num_seqs),
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
