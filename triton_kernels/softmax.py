"""Softmax pieces shared by the attention-pooling kernels (attention_kernels.py, wide_query.py).

A head's state is the running max m and sum l of its kept scores. l == 0 means every kept score is
-inf (or there is none): an empty head, 0 with zero gradients. A NaN or +inf kept score makes l
NaN (exp(NaN), exp(inf - inf)), whatever m becomes (compiled tl.maximum drops NaN, the
interpreter's keeps it), and NaN stays NaN through every rescale and merge, so out = acc / l and
every p, hence every gradient, of the head are NaN, as torch.softmax gives.
"""

import triton
import triton.language as tl


@triton.jit
def softmax_weight(s, row_max, den, keep):
    """p = exp(s - m) / l for kept rows of a nonempty head (NaN if l is), else 0."""
    nonempty = keep & (den != 0)
    return tl.where(nonempty, tl.exp(s - tl.where(nonempty, row_max, 0)) / tl.where(nonempty, den, 1), 0)


@triton.jit
def score_grad(p, g_dot_x_minus_out, scale, den, keep):
    """scale * ds, ds = p * g . (x - out), for kept rows of a nonempty head, else 0: an empty head's
    NaN token (0 * NaN) or a nan / inf scale (0 * inf) gives no gradient there."""
    return tl.where(keep & (den != 0), (p * g_dot_x_minus_out * scale).to(p.dtype), 0)


@triton.jit
def online_softmax_step(row_max, den, s):
    """Folds a tile of scores s (-inf where not kept) into the running max m and sum l: returns
    (new m, new l, alpha = the factor rescaling what was accumulated so far, p of the tile)."""
    new_max = tl.maximum(row_max, tl.max(s, 0))
    shift = tl.where(new_max == float("-inf"), 0, new_max)  # all -inf so far: p = 0, no NaN
    alpha = tl.exp(row_max - shift)
    p = tl.exp(s - shift)
    return new_max, den * alpha + tl.sum(p, 0), alpha, p
