"""What a launcher does around a kernel launch, for every op kind: run on the input's GPU, pass
cu_seqlens and the mask as the kernels read them (and, for kernels over chunks of rows, the arguments
they all take), pick the channel block, the accumulator type and the launch options of the row-tile
kernels.

Where the rows are and how the work is split over programs is split_plan.py's job.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..contract import accumulation_dtype
from .split_plan import Geometry, SplitPlan


def launches_on_input_device(launcher):
    """Runs `launcher` with its first tensor argument's GPU as the current device, so that its
    kernels go there and not to torch's current device (a model spread over GPUs)."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return guarded


# Launch options of the row-tile kernels (4096-element tiles): 8 warps, and an explicit register
# budget. Without one, ptxas picks an occupancy tier itself and at a tier's edge spills a few bytes to
# local memory (8-byte spills at 64 / 80 / 128 / 168 registers on sm_80 and sm_90 under Triton 3.6 and
# 3.9, found by .ci/check_gpu_compile); given a budget it allocates within it, rematerializing
# instead of spilling. 128 registers keep two 8-warp programs resident per SM.
TILE_WARPS = 8
TILE_REGISTERS = 128


def tile_launch(max_registers: int = TILE_REGISTERS) -> dict:
    return dict(num_warps=TILE_WARPS, maxnreg=max_registers)


def kernel_cu_seqlens(cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """cu_seqlens as the kernels read it: contiguous, since they address entry b at
    cu_seqlens_ptr + b. A strided view (cu[::2]) would otherwise give other sequences, and an
    expanded one (stride 0) read past its storage. The copy, when there is one, is B + 1 integers."""
    return None if cu_seqlens is None else cu_seqlens.contiguous()


def kernel_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """The mask as the kernels read it (bool viewed as uint8, no copy) and its (B, L) strides.

    A varlen mask (per-token weights (T,)) gets strides (0, stride): the kernels address the mask at
    seq * stride_b + row * stride_row, and a varlen row is the global token t, so they read w[t].
    """
    if mask is None:
        return None, (0, 0)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if mask.dim() == 1:
        return mask, (0, mask.stride(0))
    return mask, mask.stride()


def chunk_arguments(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    geo: Geometry,
    plan: SplitPlan,
) -> dict:
    """The launch arguments of a kernel whose programs take chunks of rows (split_plan.program_chunk):
    x and where its rows are, the mask, cu_seqlens (as kernel_cu_seqlens gives it) and the split
    plan. An absent input is passed as x: its pointer is never read."""
    mask_view, (stride_mb, stride_mr) = kernel_mask(mask)
    stride_xb, stride_xr, stride_xh = geo.strides
    return dict(
        x_ptr=x,
        mask_ptr=mask_view if mask is not None else x,
        cu_seqlens_ptr=cu_seqlens if cu_seqlens is not None else x,
        chunk_offsets_ptr=plan.chunk_offsets if plan.chunk_offsets is not None else x,
        num_seqs=geo.num_seqs,
        seq_len=geo.seq_len,
        num_rows=geo.num_rows,
        stride_xb=stride_xb,
        stride_xr=stride_xr,
        stride_xh=stride_xh,
        stride_mb=stride_mb,
        stride_mr=stride_mr,
        chunk_rows=plan.chunk_rows,
        splits=plan.splits,
        search_iters=plan.search_iters,
        HAS_MASK=mask is not None,
        VARLEN=cu_seqlens is not None,
        SPLIT=plan.split,
    )


def triton_accumulator(dtype: torch.dtype):
    """fused_pool.contract.accumulation_dtype of x's dtype as a Triton type (the ACC_DTYPE constexpr)."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def channel_block(hidden: int, largest: int = 256) -> int:
    """Channels per program: the largest power of two <= `largest` that wastes little of the last
    block (768 -> 256, 384 -> 128, 1000 -> 256, 1 -> 16)."""
    if hidden <= largest:
        return max(16, triton.next_power_of_2(hidden))
    block = largest
    while block > 64 and (triton.cdiv(hidden, block) * block - hidden) * 8 > hidden:
        block //= 2
    return block
