"""Triton kernels of span pooling (mean / max / mean_max over token ranges [start, end) of x (T, H));
span.py launches them.

Forward (`span_fwd_kernel`): a program reduces one chunk of one span's rows over BLOCK_H channels
with pool_kernels' `reduce_chunk` (a span is a varlen sequence whose bounds come from `spans`, and
spans may overlap). Span s has `splits` chunks of `chunk_rows` rows, program p -> (p // splits,
p % splits); chunks past the span's end are empty. Unsplit (splits = 1), the program writes the
result; split, it writes partials that pool_kernels' `pool_combine_kernel` folds in chunk order.

Backward (`span_bwd_kernel`): a program owns a (BLOCK_R, BLOCK_H) tile of dx and walks the spans
that may touch it (from the first to the last one that does, found by `span_tile_range_kernel`) in
increasing order, adding each intersecting span's contribution to its tile: the sum is formed in
the same order everywhere (deterministic, no float atomics) and every element of dx is written once.
"""

import triton
import triton.language as tl

from .pool_kernels import reduce_chunk
from .reduction import store_states


@triton.jit
def clamped_span(spans_ptr, span, stride_s, stride_e, num_rows):
    """[start', end') of span `span` (int64): start' = min(max(start, 0), T), end' = min(max(end,
    start'), T). Works on a scalar or a vector of span indices."""
    span_row = spans_ptr + tl.cast(span, tl.int64) * stride_s
    start = tl.load(span_row).to(tl.int64)
    end = tl.load(span_row + stride_e).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), num_rows)
    end = tl.minimum(tl.maximum(end, start), num_rows)
    return start, end


@triton.jit
def span_tile_range_kernel(
    spans_ptr,
    first_hit_ptr,
    last_hit_ptr,
    num_rows,
    stride_s,
    stride_e,
    BLOCK_R: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    """For every backward tile of BLOCK_R tokens, the first and last span that intersects it: one
    program per span marks its tiles, BLOCK_TILES at a time. Integer min / max atomics commute: the
    result does not depend on the order the programs run in."""
    span = tl.program_id(0)
    start, end = clamped_span(
        spans_ptr=spans_ptr, span=span, stride_s=stride_s, stride_e=stride_e, num_rows=num_rows
    )
    # An empty span (start == end) marks no tile: the range below is empty.
    end_tile = tl.where(start < end, (end + BLOCK_R - 1) // BLOCK_R, 0)
    for t0 in range(start // BLOCK_R, end_tile, BLOCK_TILES):
        tiles = t0 + tl.arange(0, BLOCK_TILES)
        tl.atomic_min(first_hit_ptr + tiles, span, mask=tiles < end_tile)
        tl.atomic_max(last_hit_ptr + tiles, span, mask=tiles < end_tile)


@triton.jit
def span_fwd_kernel(
    x_ptr,
    mask_ptr,
    spans_ptr,
    out_ptr,
    den_ptr,
    argmax_ptr,
    part_sum_ptr,
    part_den_ptr,
    part_max_ptr,
    part_row_ptr,
    num_rows,
    H,
    out_stride,
    stride_xr,
    stride_xh,
    stride_mr,
    stride_s,
    stride_e,
    chunk_rows,
    splits,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    h_block = tl.program_id(1)
    offs_h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    span = pid // splits if SPLIT else pid
    start, end = clamped_span(
        spans_ptr=spans_ptr, span=span, stride_s=stride_s, stride_e=stride_e, num_rows=num_rows
    )
    if SPLIT:
        # chunk_rows * splits >= T >= the span's length: the chunks cover it; later ones are empty.
        first = tl.minimum(start + (pid % splits).to(tl.int64) * chunk_rows, end)
        last = tl.minimum(first + chunk_rows, end)
    else:
        first = start
        last = end
    # A span is a varlen sequence: sequence stride 0 (x and the mask are (T, ...)), so reduce_chunk
    # reads token t at x + t * stride_xr and returns argmax rows as t - start'.
    states = reduce_chunk(
        x_ptr=x_ptr,
        mask_ptr=mask_ptr,
        seq=span,
        start=start,
        first=first,
        last=last,
        offs_h=offs_h,
        h_in=h_in,
        stride_xb=0,
        stride_xr=stride_xr,
        stride_xh=stride_xh,
        stride_mb=0,
        stride_mr=stride_mr,
        MEAN=MEAN,
        MAX=MAX,
        HAS_MASK=HAS_MASK,
        WEIGHTED=WEIGHTED,
        ACC_DTYPE=ACC_DTYPE,
        BLOCK_R=BLOCK_R,
        BLOCK_H=BLOCK_H,
    )
    store_states(
        results=(out_ptr, den_ptr, argmax_ptr),
        partials=(part_sum_ptr, part_den_ptr, part_max_ptr, part_row_ptr),
        states=states,
        chunk=pid,
        seq=span,
        offs=offs_h,
        offs_in=h_in,
        width=H,
        out_stride=out_stride,
        col_block=h_block,
        MEAN=MEAN,
        MAX=MAX,
        STATES=False,
        SPLIT=SPLIT,
    )


@triton.jit
def _add_span(
    dx,
    span,
    start,
    end,
    rows,
    w,
    grad_ptr,
    den_ptr,
    argmax_ptr,
    offs_h,
    h_in,
    H,
    grad_stride,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dx + the contribution of span `span` ([start, end) clamped) to the tile's rows: w * g / den on
    its rows (mean), g on the rows its argmax names (max)."""
    inside = (rows >= start) & (rows < end)
    g_row = grad_ptr + tl.cast(span, tl.int64) * grad_stride + offs_h
    if MEAN:
        den = tl.load(den_ptr + span)
        g = tl.load(g_row, mask=h_in, other=0).to(ACC_DTYPE)
        g = tl.where(den != 0, g / tl.where(den != 0, den, 1), 0)
        dx += tl.where(inside, w, 0)[:, None] * g[None, :]
    if MAX:
        col = H if MEAN else 0
        winner = tl.load(argmax_ptr + tl.cast(span, tl.int64) * H + offs_h, mask=h_in, other=-1)
        g = tl.load(g_row + col, mask=h_in, other=0).to(ACC_DTYPE)
        # argmax is t - start' of a kept token, or -1; compared only on the span's own rows.
        is_winner = inside[:, None] & ((rows - start).to(tl.int32)[:, None] == winner[None, :])
        dx += tl.where(is_winner, g[None, :], 0)
    return dx


@triton.jit
def span_bwd_kernel(
    grad_ptr,
    mask_ptr,
    spans_ptr,
    first_hit_ptr,
    last_hit_ptr,
    den_ptr,
    argmax_ptr,
    dx_ptr,
    num_rows,
    H,
    grad_stride,
    stride_mr,
    stride_s,
    stride_e,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    tile_start = tl.program_id(0).to(tl.int64) * BLOCK_R
    tile_end = tl.minimum(tile_start + BLOCK_R, num_rows)
    rows = tile_start + tl.arange(0, BLOCK_R)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    in_x = rows < num_rows
    # Mean weights of the tile's tokens (the mask only; x is never read in the backward).
    if HAS_MASK:
        m = tl.load(mask_ptr + rows * stride_mr, mask=in_x, other=0)
        keep = in_x & (m != 0)
        w = tl.where(keep, m.to(ACC_DTYPE), 0) if WEIGHTED else keep.to(ACC_DTYPE)
    else:
        w = in_x.to(ACC_DTYPE)
    dx = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC_DTYPE)
    # Only spans [first_hit, last_hit] can touch the tile (span_tile_range_kernel); none: an empty range.
    first_hit = tl.load(first_hit_ptr + tl.program_id(0))
    end_hit = tl.load(last_hit_ptr + tl.program_id(0)) + 1
    for s0 in range(first_hit, end_hit, BLOCK_S):
        # Test BLOCK_S spans at once against the tile and walk them one by one only if one hits it.
        block = s0 + tl.arange(0, BLOCK_S)
        starts, ends = clamped_span(
            spans_ptr=spans_ptr,
            span=tl.minimum(block, end_hit - 1),
            stride_s=stride_s,
            stride_e=stride_e,
            num_rows=num_rows,
        )
        hits = (block < end_hit) & (starts < tile_end) & (ends > tile_start) & (starts < ends)
        if tl.sum(hits.to(tl.int32), 0) > 0:
            for span in range(s0, tl.minimum(s0 + BLOCK_S, end_hit)):
                start, end = clamped_span(
                    spans_ptr=spans_ptr, span=span, stride_s=stride_s, stride_e=stride_e, num_rows=num_rows
                )
                if (start < tile_end) & (end > tile_start) & (start < end):
                    dx = _add_span(
                        dx=dx,
                        span=span,
                        start=start,
                        end=end,
                        rows=rows,
                        w=w,
                        grad_ptr=grad_ptr,
                        den_ptr=den_ptr,
                        argmax_ptr=argmax_ptr,
                        offs_h=offs_h,
                        h_in=h_in,
                        H=H,
                        grad_stride=grad_stride,
                        MEAN=MEAN,
                        MAX=MAX,
                        ACC_DTYPE=ACC_DTYPE,
                    )
    out_in = in_x[:, None] & h_in[None, :]
    tl.store(dx_ptr + rows[:, None] * H + offs_h[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_in)
