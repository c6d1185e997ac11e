"""What the reducing kernels share (pool_kernels.py, span_kernels.py, linear_kernels.py): which rows
of a tile count and with what weight, the running max with its first-row tie-break, and how a
program hands on its states (store_states): as the partials pool_combine_kernel folds in chunk
order, or as the pooled row.
"""

import triton
import triton.language as tl


@triton.jit
def kept_rows(mask_ptrs, keep, HAS_MASK: tl.constexpr, WEIGHTED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(keep, w) of a tile of rows: keep narrowed to mask != 0, and each row's weight, the mask's
    value (WEIGHTED) or 1 where kept, 0 elsewhere. mask_ptrs: the rows' mask entries, read where keep."""
    if HAS_MASK:
        m = tl.load(mask_ptrs, mask=keep, other=0)
        keep = keep & (m != 0)
        w = tl.where(keep, m.to(ACC_DTYPE), 0) if WEIGHTED else keep.to(ACC_DTYPE)
    else:
        w = keep.to(ACC_DTYPE)
    return keep, w


@triton.jit
def take_max(best, best_row, value, row, valid):
    """Running max with first-row tie-break: takes (value, row) where valid and it wins; a NaN wins
    over numbers and the first NaN is kept."""
    best_nan = best != best
    take = valid & ((best_row < 0) | ((value != value) & ~best_nan) | (~best_nan & (value > best)))
    return tl.where(take, value, best), tl.where(take, row, best_row)


@triton.jit
def column_max(values, rows, valid):
    """(max, its smallest row) per column of a 2-D tile over the valid entries, row -1 for a column
    with none; a NaN wins over numbers, the smallest NaN row its row. rows: each entry's row index,
    broadcast against the tile ((BLOCK, 1) or the tile's shape). 2147483647 (int32 max): no row."""
    is_nan = valid & (values != values)
    nan_row = tl.min(tl.where(is_nan, rows, 2147483647), 0)
    numbers = tl.where(is_nan | ~valid, float("-inf"), values)
    top = tl.max(numbers, 0)
    top_row = tl.min(tl.where(valid & ~is_nan & (numbers == top[None, :]), rows, 2147483647), 0)
    has_nan = nan_row != 2147483647
    best = tl.where(has_nan, float("nan"), top)
    row = tl.where(has_nan, nan_row, tl.where(top_row != 2147483647, top_row, -1))
    return best, row


@triton.jit
def store_states(
    results,
    partials,
    states,
    chunk,
    seq,
    offs,
    offs_in,
    width,
    out_stride,
    col_block,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    STATES: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Hands on a program's states (total, weight, best, best_row), as reduce_chunk returns them, over
    columns `offs` (block `col_block`) of `width`.

    SPLIT: as chunk `chunk`'s partials (part_sum, part_den, part_max, part_row pointers), which
    pool_combine_kernel reads: (chunks, width) sums, maxima and rows, and (chunks,) sums of weights
    (from the first column block). Empty chunks write neutral partials too (0, 0, -inf with row -1):
    the combine reads all.

    Else as the pooled row of `seq` (results: out, den, argmax pointers): mean = total / weight (0 if
    empty), max (0 if empty), and what the backward reads (den, argmax (B, width)). STATES: the mean's
    state instead, total undivided. MEAN and MAX together: mean_max, the max in columns
    [width, 2 width)."""
    total, weight, best, best_row = states
    if SPLIT:
        part_sum_ptr, part_den_ptr, part_max_ptr, part_row_ptr = partials
        part = chunk.to(tl.int64) * width + offs
        if MEAN:
            tl.store(part_sum_ptr + part, total, mask=offs_in)
            tl.store(part_den_ptr + chunk, weight, mask=col_block == 0)
        if MAX:
            tl.store(part_max_ptr + part, best, mask=offs_in)
            tl.store(part_row_ptr + part, best_row, mask=offs_in)
    else:
        out_ptr, den_ptr, argmax_ptr = results
        out_row = out_ptr + seq.to(tl.int64) * out_stride
        if MEAN:
            if STATES:
                mean = total
            else:
                nonzero = weight != 0
                mean = tl.where(nonzero, total / tl.where(nonzero, weight, 1), 0)
            tl.store(out_row + offs, mean.to(out_ptr.dtype.element_ty), mask=offs_in)
            tl.store(den_ptr + seq, weight, mask=col_block == 0)
        if MAX:
            col = width if MEAN else 0
            pooled_max = tl.where(best_row >= 0, best, 0).to(out_ptr.dtype.element_ty)
            tl.store(out_row + col + offs, pooled_max, mask=offs_in)
            tl.store(argmax_ptr + seq.to(tl.int64) * width + offs, best_row, mask=offs_in)
