"""The span op kind on Triton: masked mean, masked max and mean_max over token ranges [start, end) of
x (T, H), forward and backward, in the kind's spec signatures (`span_fwd`, `span_bwd`;
fused_pool.specs). The kernels are in span_kernels.py.

Spans may overlap, nest, repeat, be empty or malformed (clamped in the kernels: start' =
min(max(start, 0), T), end' = min(max(end, start'), T)). Saved for backward: sum(w) per span (mean)
and the int32 argmax per (span, channel) as t - start' (max; -1 for a span with no kept token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton

from ..contract import MAX, MEAN, accumulation_dtype
from .launch import channel_block, kernel_mask, launches_on_input_device, tile_launch, triton_accumulator
from .pool_kernels import pool_combine_kernel
from .span_kernels import span_bwd_kernel, span_fwd_kernel, span_tile_range_kernel
from .split_plan import MIN_CHUNK_ROWS, resident_programs

# Spans tested at once against a backward tile (span_bwd_kernel). A tile tests the spans between
# the first and the last that touch it: ordered spans (words, sentences) test only their own;
# spans in no order (a long one first and last) can make a tile test up to all S.
SPANS_PER_TEST = 128


def _weighted(mask: torch.Tensor | None, mode: int) -> bool:
    """A floating mask weights the mean; every other use keeps w != 0."""
    return mask is not None and bool(mode & MEAN) and mask.is_floating_point()


def _rows_per_tile(block_h: int) -> int:
    return max(1, 4096 // block_h)


class SpanSplit(NamedTuple):
    """How the forward spreads the spans' rows over programs: span s has `splits` chunks of
    `chunk_rows` rows (chunk_rows * splits >= T, so any span fits; chunks past its end are empty)."""

    splits: int
    chunk_rows: int


def plan_span_split(num_spans: int, num_rows: int, channel_blocks: int, block_rows: int, device) -> SpanSplit:
    """Few spans (fewer programs than two waves of resident ones) are split so that the grid fills
    the GPU whatever their lengths, which the host does not know (reading them would sync). The
    grid is at most about two waves: chunks of short spans that are empty cost a program each."""
    wanted = 2 * resident_programs(device)
    programs = num_spans * channel_blocks
    if programs >= wanted or num_rows <= MIN_CHUNK_ROWS:
        return SpanSplit(1, num_rows)
    splits = min(triton.cdiv(wanted, programs), triton.cdiv(num_rows, MIN_CHUNK_ROWS))
    chunk_rows = triton.cdiv(triton.cdiv(num_rows, splits), block_rows) * block_rows
    return SpanSplit(triton.cdiv(num_rows, chunk_rows), chunk_rows)


@launches_on_input_device
def span_fwd(
    x: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor | None, mode: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (T, H) any strides; spans: (S, 2) int32 / int64 any strides; mask: None or (T,); mode:
    MEAN and / or MAX bits. Returns (out (S, H or 2H) in x.dtype, sum of weights (S,) float32/64
    if mean else empty, argmax (S, H) int32 (t - start', -1 if empty) if max else empty)."""
    num_rows, hidden = x.shape
    num_spans = spans.shape[0]
    acc = accumulation_dtype(x.dtype)
    want_mean, want_max = bool(mode & MEAN), bool(mode & MAX)
    width = 2 * hidden if want_mean and want_max else hidden
    out = torch.empty(num_spans, width, dtype=x.dtype, device=x.device)
    den = torch.empty(num_spans if want_mean else 0, dtype=acc, device=x.device)
    argmax = torch.empty((num_spans, hidden) if want_max else (0,), dtype=torch.int32, device=x.device)
    if num_spans == 0 or hidden == 0 or num_rows == 0:  # T = 0: every span clamps to [0, 0)
        return out.zero_(), den.zero_(), argmax.fill_(-1)

    mask_view, (_, stride_mr) = kernel_mask(mask)
    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    channel_blocks = triton.cdiv(hidden, block_h)
    plan = plan_span_split(num_spans, num_rows, channel_blocks, block_r, x.device)
    split = plan.splits > 1
    num_chunks = num_spans * plan.splits
    if split:
        part_sum = torch.empty(num_chunks if want_mean else 0, hidden, dtype=acc, device=x.device)
        part_den = torch.empty(num_chunks if want_mean else 0, dtype=acc, device=x.device)
        part_max = torch.empty(num_chunks if want_max else 0, hidden, dtype=acc, device=x.device)
        part_row = torch.empty(num_chunks if want_max else 0, hidden, dtype=torch.int32, device=x.device)
    else:
        part_sum = part_den = part_max = part_row = out  # unused
    flags = dict(MEAN=want_mean, MAX=want_max, ACC_DTYPE=triton_accumulator(x.dtype))
    results = dict(out_ptr=out, den_ptr=den, argmax_ptr=argmax, out_stride=out.stride(0))
    partials = dict(
        part_sum_ptr=part_sum, part_den_ptr=part_den, part_max_ptr=part_max, part_row_ptr=part_row
    )
    span_fwd_kernel[(num_chunks, channel_blocks)](
        x_ptr=x,
        mask_ptr=mask_view if mask is not None else x,
        spans_ptr=spans,
        **results,
        **partials,
        num_rows=num_rows,
        H=hidden,
        stride_xr=x.stride(0),
        stride_xh=x.stride(1),
        stride_mr=stride_mr,
        stride_s=spans.stride(0),
        stride_e=spans.stride(1),
        chunk_rows=plan.chunk_rows,
        splits=plan.splits,
        HAS_MASK=mask is not None,
        WEIGHTED=_weighted(mask, mode),
        SPLIT=split,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        **tile_launch(),
        **flags,
    )
    if split:
        # Span s's partials are chunks [s * splits, (s + 1) * splits): the padded layout of the pool
        # combine, folded in chunk (= row) order.
        pool_combine_kernel[(num_spans, channel_blocks)](
            chunk_offsets_ptr=out,  # unused (VARLEN=False)
            **results,
            **partials,
            H=hidden,
            splits=plan.splits,
            num_chunks=num_chunks,
            STATES=False,
            VARLEN=False,
            BLOCK_H=block_h,
            num_warps=4,
            **flags,
        )
    return out, den, argmax


@launches_on_input_device
def span_bwd(
    grad_out: torch.Tensor,
    spans: torch.Tensor,
    mask: torch.Tensor | None,
    den: torch.Tensor,
    argmax: torch.Tensor,
    x_shape: Sequence[int],
    x_dtype: torch.dtype,
    mode: int,
) -> torch.Tensor:
    """dx of shape x_shape ((T, H); ints or SymInts), contiguous, in x_dtype; every element written
    (0 on tokens in no span or not kept). den and argmax: what span_fwd returned."""
    x_shape = list(x_shape)
    hidden = x_shape[-1]
    dx = torch.empty(x_shape, dtype=x_dtype, device=grad_out.device)
    num_rows = dx.numel() // hidden if hidden else 0
    num_spans = spans.shape[0]
    if num_rows == 0 or hidden == 0:
        return dx
    if num_spans == 0:
        return dx.zero_()
    grad_out = grad_out.contiguous()
    # Only the mean reads the mask (weights); max gradients go where argmax says, already kept.
    mask = mask if mode & MEAN else None
    mask_view, (_, stride_mr) = kernel_mask(mask)
    block_h = channel_block(hidden)
    block_r = _rows_per_tile(block_h)
    num_tiles = triton.cdiv(num_rows, block_r)
    first_hit = torch.full((num_tiles,), num_spans, dtype=torch.int32, device=dx.device)
    last_hit = torch.full((num_tiles,), -1, dtype=torch.int32, device=dx.device)
    span_tile_range_kernel[(num_spans,)](
        spans_ptr=spans,
        first_hit_ptr=first_hit,
        last_hit_ptr=last_hit,
        num_rows=num_rows,
        stride_s=spans.stride(0),
        stride_e=spans.stride(1),
        BLOCK_R=block_r,
        BLOCK_TILES=512,
        num_warps=4,
    )
    span_bwd_kernel[(num_tiles, triton.cdiv(hidden, block_h))](
        grad_ptr=grad_out,
        mask_ptr=mask_view if mask is not None else grad_out,
        spans_ptr=spans,
        first_hit_ptr=first_hit,
        last_hit_ptr=last_hit,
        den_ptr=den if mode & MEAN else grad_out,
        argmax_ptr=argmax if mode & MAX else grad_out,
        dx_ptr=dx,
        num_rows=num_rows,
        H=hidden,
        grad_stride=grad_out.stride(0),
        stride_mr=stride_mr,
        stride_s=spans.stride(0),
        stride_e=spans.stride(1),
        MEAN=bool(mode & MEAN),
        MAX=bool(mode & MAX),
        HAS_MASK=mask is not None,
        WEIGHTED=_weighted(mask, mode),
        ACC_DTYPE=triton_accumulator(x_dtype),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        BLOCK_S=SPANS_PER_TEST,
        **tile_launch(),
    )
    return dx
