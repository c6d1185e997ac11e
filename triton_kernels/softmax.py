"""Softmax pieces shared by the attention-pooling kernels (attention_kernels.py, wide_query.py)."""

import triton
import triton.language as tl


@triton.jit
def softmax_weight(s, row_max, den, keep):
    """p = exp(s - m) / l for kept rows of a nonempty head, else 0."""
    nonempty = keep & (den > 0)
    return tl.where(nonempty, tl.exp(s - tl.where(nonempty, row_max, 0)) / tl.where(nonempty, den, 1), 0)


@triton.jit
def online_softmax_step(row_max, den, s):
    """Folds a tile of scores s (-inf where not kept) into the running max m and sum l: returns
    (new m, new l, alpha = the factor rescaling what was accumulated so far, p of the tile)."""
    new_max = tl.maximum(row_max, tl.max(s, 0))
    shift = tl.where(new_max == float("-inf"), 0, new_max)  # all -inf so far: p = 0, no NaN
    alpha = tl.exp(row_max - shift)
    p = tl.exp(s - shift)
    return new_max, den * alpha + tl.sum(p, 0), alpha, p
