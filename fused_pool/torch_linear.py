"""linear_pool's "torch" backend: `linear_fwd` / `linear_bwd` (fused_pool.specs LINEAR) in plain
PyTorch, the projection computed block by block over the kept tokens, so that no (tokens, N) tensor
is ever built: each block's (rows, N) projection lives until the block is reduced.

The blocks hold kept tokens only (padding is never read) in token order, and may span several
sequences: each block's values are reduced per sequence (a (sequences, rows) matrix product for the
sums, scatter_reduce for the max) into running (B, N) states. Finding the kept tokens reads their
count back to the host once per call. Deterministic on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contract import ACTIVATION_FUNCTIONS, ACTIVATIONS, MAX, MEAN, accumulation_dtype, log1p_relu
from .torch_kernels import Segments

# Elements of one block's (rows, N) projection: 8 MiB in float32 (68 rows at N = 30522). The max
# merge holds a few (rows, N) int64 temporaries on top: the forward peak stays near 60 MiB there.
BLOCK_ELEMENTS = 1 << 21
_NO_INDEX = torch.iinfo(torch.int64).max


def _activation(code: int):
    return ACTIVATION_FUNCTIONS[ACTIVATIONS[code]]


def _positive(z: Tensor, value: Tensor) -> Tensor:
    """value where z > 0, else 0 (NaN z keeps value), as torch's relu backward (threshold_backward)."""
    return torch.where(z <= 0, 0, value)


# act'(z) in closed form, as each activation's autograd formula gives it (also at z = 0 and NaN). Not
# autograd itself: the backward runs inside a custom op under torch.compile, where nothing records.
_DERIVATIVES = {
    "none": lambda z: torch.ones_like(z),
    "relu": lambda z: _positive(z, torch.ones_like(z)),
    "log1p_relu": lambda z: _positive(z, 1 / (1 + torch.relu(z))),
    "log1p_log1p_relu": lambda z: _positive(z, 1 / ((1 + torch.relu(z)) * (1 + log1p_relu(z)))),
    "gelu": lambda z: (
        0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) * (2 * math.pi) ** -0.5
    ),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "silu": lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
}


def _activation_grad(z: Tensor, upstream: Tensor, code: int) -> Tensor:
    """upstream * act'(z)."""
    return upstream * _DERIVATIVES[ACTIVATIONS[code]](z)


class _KeptTokens:
    """The kept tokens of a padded or varlen batch as flat rows of x: `rows` (kept,) int64 row of
    x.reshape(-1, H), `seq` its sequence, `index` its position within the sequence, `weight` its mask
    weight (accumulation dtype), all in token order."""

    def __init__(self, x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, acc: torch.dtype):
        seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
        self.num_seqs = seg.num_seqs
        keep = seg.keep.reshape(-1)
        self.rows = keep.nonzero().squeeze(1)  # host sync: the number of kept tokens
        if seg.varlen:
            self.seq = seg.seq[self.rows]
        else:
            self.seq = self.rows // max(x.shape[1], 1)
        self.index = seg.index.reshape(-1)[self.rows]
        self.weight = seg.weight.reshape(-1)[self.rows]

    def blocks(self, features: int):
        """(start, end) slices of the kept tokens, each block's projection <= BLOCK_ELEMENTS."""
        size = max(1, BLOCK_ELEMENTS // max(features, 1))
        for start in range(0, self.rows.shape[0], size):
            yield start, min(start + size, self.rows.shape[0])


def _project(flat_x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, acc) -> tuple[Tensor, Tensor]:
    """(x rows (R, H), z = x W^T + b (R, N)) in the accumulation dtype."""
    xb = flat_x[rows].to(acc)
    z = xb @ weight.to(acc).T
    return xb, (z if bias is None else z + bias.to(acc))


def _merge_max(best: Tensor, best_index: Tensor, seq: Tensor, index: Tensor, values: Tensor) -> None:
    """Folds one block's values (R, N) of tokens (seq, index) into the running max (B, N) and the
    index of its first maximal token (_NO_INDEX where none yet). A NaN wins; earlier tokens win ties."""
    num_seqs = best.shape[0]
    nan = values.isnan()
    spread = seq[:, None].expand_as(values)
    # Within the block: the top per sequence (NaN above every number), then its first token.
    keyed = torch.where(nan, float("inf"), values)
    top = best.new_full(best.shape, float("-inf")).scatter_reduce(0, spread, keyed, "amax")
    has_nan = nan.new_zeros(num_seqs, nan.shape[1], dtype=torch.uint8)
    has_nan = has_nan.scatter_reduce(0, spread, nan.to(torch.uint8), "amax") != 0
    is_top = torch.where(has_nan[seq], nan, ~nan & (values == top[seq]))
    candidates = torch.where(is_top, index[:, None], _NO_INDEX)
    first = best_index.new_full(best.shape, _NO_INDEX).scatter_reduce(0, spread, candidates, "amin")
    block_best = torch.where(has_nan, float("nan"), top)
    # Against the earlier blocks: a new NaN, or a larger number where the running max is no NaN.
    found = first != _NO_INDEX
    earlier_nan = best.isnan() & (best_index != _NO_INDEX)
    wins = found & ~earlier_nan & ((best_index == _NO_INDEX) | has_nan | (top > best))
    best.copy_(torch.where(wins, block_best, best))
    best_index.copy_(torch.where(wins, first, best_index))


def linear_fwd(x: Tensor, weight: Tensor, bias, mask, cu_seqlens, max_seqlen, mode: int, activation: int):
    """(out (B, N) in x.dtype, den (B,) for MEAN else empty, int32 argmax (B, N) for MAX else empty)."""
    acc = accumulation_dtype(x.dtype)
    tokens = _KeptTokens(x, mask, cu_seqlens, acc)
    flat_x = x.flatten(0, -2)  # (tokens, H), also for H = 0
    batch, features = tokens.num_seqs, weight.shape[0]
    act = _activation(activation)
    den, argmax = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=torch.int32)
    if mode & MAX:
        best = x.new_full((batch, features), float("-inf"), dtype=acc)
        best_index = torch.full((batch, features), _NO_INDEX, dtype=torch.int64, device=x.device)
    else:
        total = x.new_zeros(batch, features, dtype=acc)
    for start, end in tokens.blocks(features):
        seq = tokens.seq[start:end]
        _, z = _project(flat_x, weight, bias, tokens.rows[start:end], acc)
        values = act(z)
        if mode & MAX:
            _merge_max(best, best_index, seq, tokens.index[start:end], values)
        else:
            # Each sequence's rows summed by a (B, R) matrix product: deterministic on any device.
            owner = (seq[None, :] == torch.arange(batch, device=x.device)[:, None]).to(acc)
            total += (owner * tokens.weight[start:end]) @ values
    if mode & MAX:
        found = best_index != _NO_INDEX
        out = torch.where(found, best, 0)
        argmax = torch.where(found, best_index, -1).to(torch.int32)
    else:
        out = total
        if mode & MEAN:
            den = x.new_zeros(batch, dtype=acc).index_add_(0, tokens.seq, tokens.weight)
            nonzero = den[:, None] != 0
            out = torch.where(nonzero, total / torch.where(nonzero, den[:, None], 1), 0)
    return out.to(x.dtype), den, argmax


def linear_bwd(grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode: int, activation: int):
    """(dx like x, dweight like weight, dbias (N,)): MAX from the argmax tokens alone (B N H work),
    SUM / MEAN recomputing each block's projection."""
    acc = accumulation_dtype(x.dtype)
    features = weight.shape[0]
    flat_x = x.flatten(0, -2)
    grad = grad_out.to(acc)
    w_acc = weight.to(acc)
    dx = torch.zeros(flat_x.shape, dtype=acc, device=x.device)
    dweight = torch.zeros(weight.shape, dtype=acc, device=x.device)
    dbias = torch.zeros(features, dtype=acc, device=x.device)
    if mode & MAX:
        _max_backward(grad, flat_x, x, weight, bias, cu_seqlens, argmax, activation, dx, dweight, dbias)
    else:
        tokens = _KeptTokens(x, mask, cu_seqlens, acc)
        scale = tokens.weight
        if mode & MEAN:
            inverse = torch.where(den != 0, 1 / torch.where(den != 0, den, 1), 0)
            scale = scale * inverse[tokens.seq]
        for start, end in tokens.blocks(features):
            rows, seq = tokens.rows[start:end], tokens.seq[start:end]
            xb, z = _project(flat_x, weight, bias, rows, acc)
            dz = _activation_grad(z, grad[seq] * scale[start:end, None], activation)
            dx[rows] = dz @ w_acc  # each kept row once: blocks never share a row
            dweight.addmm_(dz.T, xb)  # in place: no (N, H) temporary per block
            dbias += dz.sum(0)
    return dx.reshape(x.shape).to(x.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)


def _max_backward(grad, flat_x, x, weight, bias, cu_seqlens, argmax, activation, dx, dweight, dbias) -> None:
    """Gradients through each (sequence, feature)'s winning token, features in chunks so that the
    gathered (B, chunk, H) rows stay bounded: B N H work, never a (tokens, N) product."""
    acc, hidden = dx.dtype, flat_x.shape[1]
    batch, features = argmax.shape
    if flat_x.shape[0] == 0:  # no token at all: no winner
        return
    if cu_seqlens is None:
        first_row = torch.arange(batch, device=x.device) * (x.shape[1] if x.dim() == 3 else 0)
    else:
        first_row = cu_seqlens[:-1].long().clamp(0, flat_x.shape[0])
    chunk = max(1, BLOCK_ELEMENTS // max(batch * hidden, 1))
    for start in range(0, features, chunk):
        end = min(start + chunk, features)
        winner = argmax[:, start:end].long()
        found = winner >= 0
        rows = torch.where(found, first_row[:, None] + winner, 0)  # (B, chunk)
        xg = torch.where(found[..., None], flat_x[rows].to(acc), 0)  # (B, chunk, H)
        w = weight[start:end].to(acc)
        z = (xg * w).sum(-1)
        if bias is not None:
            z = z + bias[start:end].to(acc)
        dz = torch.where(found, _activation_grad(z, grad[:, start:end], activation), 0)
        dweight[start:end] += (dz[..., None] * xg).sum(0)
        dbias[start:end] += dz.sum(0)
        # Features in increasing order, added to their winning rows (index_add_: in order on CPU).
        dx.index_add_(0, rows.reshape(-1), (dz[..., None] * w).flatten(0, 1))
