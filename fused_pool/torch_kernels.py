"""The "torch" backend: the fused backends' kernels written in plain PyTorch.

The same kernels, in the op kinds' signatures (fused_pool.specs), as fused_pool.triton_kernels:
`pool_fwd` / `pool_bwd` return and take (out, den, argmax), `attention_fwd` / `attention_bwd` and
`query_attention_fwd` / `query_attention_bwd` (out, stats = softmax (m, l)), `span_fwd` / `span_bwd`
(out, den, argmax, on the (span, token) pairs of `SpanPairs`). Written for clarity: every
token is handled through `Segments`, which maps per-sequence values to tokens and reduces tokens to
sequences, for padded (B, L) and varlen (T,) token axes alike. No host sync (varlen sequences are
found with searchsorted, not read back; the span kernels read the spans' total length back once),
deterministic on CPU (the span kernels on every device). Not fused: temporaries of the size of
x are fine here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import MAX, MEAN, STATES, accumulation_dtype
from .padding import segment_bounds
from .partials import MeanState, mean_of

_NO_INDEX = torch.iinfo(torch.int64).max


class Segments:
    """The token axis of a padded (B, L, ...) or varlen (T, ...) batch.

    `keep` (tokens,) bool: the token belongs to a sequence and its mask is nonzero; `index`
    (tokens,) int64: its position within its sequence (l padded, t - start varlen); `weight`: the
    mask as float weights where kept (a floating mask weights the mean), in the accumulation dtype.
    """

    def __init__(self, x_shape, mask: Tensor | None, cu_seqlens: Tensor | None, acc: torch.dtype, device):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            num_tokens = x_shape[0]
            self.num_seqs = cu_seqlens.shape[0] - 1
            starts, ends = segment_bounds(cu_seqlens, num_tokens)
            rows = torch.arange(num_tokens, device=device)
            # The sequence of each token: the first whose end is past it (skips empty sequences).
            seq = torch.searchsorted(ends, rows, right=True)
            inside = seq < self.num_seqs
            self.seq = torch.where(inside, seq, self.num_seqs)  # out of every sequence: a dump row
            start = torch.cat([starts, starts.new_zeros(1)])[self.seq]
            inside &= rows >= start
            self.index = rows - start
        else:
            self.num_seqs, length = x_shape[0], x_shape[1]
            inside = torch.ones(x_shape[:2], dtype=torch.bool, device=device)
            self.index = torch.arange(length, device=device).expand(x_shape[:2])
        self.keep = inside if mask is None else inside & (mask != 0)
        if mask is not None and mask.is_floating_point():
            self.weight = torch.where(self.keep, mask.to(acc), 0)
        else:
            self.weight = self.keep.to(acc)

    def per_token(self, per_seq: Tensor) -> Tensor:
        """(B, ...) -> (tokens, ...): each token gets its sequence's value."""
        if self.varlen:
            dump = per_seq.new_zeros(1, *per_seq.shape[1:])
            return torch.cat([per_seq, dump])[self.seq]
        return per_seq[:, None]

    def sum(self, per_token: Tensor) -> Tensor:
        """(tokens, ...) -> (B, ...), summing each sequence's tokens (0 where the token is not kept
        is the caller's job)."""
        if self.varlen:
            total = per_token.new_zeros(self.num_seqs + 1, *per_token.shape[1:])
            return total.index_add_(0, self.seq, per_token)[: self.num_seqs]
        return per_token.sum(1)

    def _extreme(self, per_token: Tensor, fill, reduce: str) -> Tensor:
        """amax / amin of each sequence's tokens; `fill` where a sequence has none."""
        if self.varlen:
            index = self.seq.view(-1, *([1] * (per_token.dim() - 1))).expand_as(per_token)
            out = per_token.new_full((self.num_seqs + 1, *per_token.shape[1:]), fill)
            return out.scatter_reduce_(0, index, per_token, reduce, include_self=True)[: self.num_seqs]
        if per_token.shape[1] == 0:
            return per_token.new_full((per_token.shape[0], *per_token.shape[2:]), fill)
        return per_token.amax(1) if reduce == "amax" else per_token.amin(1)

    def amax(self, per_token: Tensor, fill) -> Tensor:
        return self._extreme(per_token, fill, "amax")

    def amin(self, per_token: Tensor, fill) -> Tensor:
        return self._extreme(per_token, fill, "amin")


def _expand(flags: Tensor, like: Tensor) -> Tensor:
    """(tokens,) flags broadcast against (tokens, ...) values."""
    return flags.view(*flags.shape, *([1] * (like.dim() - flags.dim())))


# --- pool -----------------------------------------------------------------------------------------


def _mean(x: Tensor, seg: Segments, acc: torch.dtype, states: bool) -> tuple[Tensor, Tensor]:
    """(mean (B, H), 0 where the weights sum to 0; or with `states` the sum of w x), sum of w (B,)."""
    weight = seg.weight
    weighted = torch.where(_expand(seg.keep, x), x.to(acc) * _expand(weight, x), 0)
    state = MeanState(seg.sum(weighted), seg.sum(weight))
    return (state.total if states else mean_of(state)), state.den


def _max(x: Tensor, seg: Segments) -> tuple[Tensor, Tensor]:
    """(max (B, H), int32 index of the first maximal kept token, -1 if none); a kept NaN wins."""
    kept = _expand(seg.keep, x)
    index = _expand(seg.index, x)
    is_nan = kept & x.isnan()
    numbers = torch.where(kept & ~is_nan, x, float("-inf"))
    top = seg.amax(numbers, float("-inf"))
    is_top = kept & ~is_nan & (x == seg.per_token(top))
    first_top = seg.amin(torch.where(is_top, index, _NO_INDEX), _NO_INDEX)
    first_nan = seg.amin(torch.where(is_nan, index, _NO_INDEX), _NO_INDEX)
    has_nan, found = first_nan != _NO_INDEX, first_top != _NO_INDEX
    argmax = torch.where(has_nan, first_nan, torch.where(found, first_top, -1))
    value = torch.where(has_nan, float("nan"), torch.where(found, top, 0))
    return value, argmax.to(torch.int32)


def pool_fwd(x: Tensor, mask, cu_seqlens, max_seqlen, mode: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H or 2H) in x.dtype (STATES: the states in the accumulation dtype), den (B,) if mean
    else empty, int32 argmax (B, H) if max else empty)."""
    acc = accumulation_dtype(x.dtype)
    seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
    parts, den, argmax = [], x.new_empty(0, dtype=acc), x.new_empty(0, dtype=torch.int32)
    if mode & MEAN:
        mean, den = _mean(x, seg, acc, bool(mode & STATES))
        parts.append(mean)
    if mode & MAX:
        maximum, argmax = _max(x, seg)
        parts.append(maximum)
    return torch.cat(parts, -1).to(acc if mode & STATES else x.dtype), den, argmax


def pool_bwd(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode: int) -> Tensor:
    """dx (x_shape, x_dtype): w g / den[seq] (mean) + g where the token is argmax[seq] (max)."""
    acc = accumulation_dtype(x_dtype)
    seg = Segments(x_shape, mask, cu_seqlens, acc, grad_out.device)
    hidden = x_shape[-1]
    grad = seg.per_token(grad_out.to(acc))
    dx = torch.zeros(x_shape, dtype=acc, device=grad_out.device)
    if mode & MEAN:
        per_seq = seg.per_token(torch.where(den != 0, 1 / torch.where(den != 0, den, 1), 0))
        dx += torch.where(_expand(seg.keep, dx), grad[..., :hidden] * _expand(seg.weight * per_seq, dx), 0)
    if mode & MAX:
        winner = seg.per_token(argmax.long()) == _expand(seg.index, dx)
        dx += torch.where(_expand(seg.keep, dx) & winner, grad[..., -hidden:], 0)
    return dx.to(x_dtype)


# --- attention ------------------------------------------------------------------------------------


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """(..., H) -> (..., nh, D)."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))


def _scores(xs: Tensor, scores: Tensor | None, query: Tensor | None, scale: float, acc) -> Tensor:
    """(tokens, nh) scores: given, or (x_head . query_head) * scale."""
    if query is None:
        return scores.to(acc)
    return (_heads(xs, query.shape[0]) * query.to(acc)).sum(-1) * scale


def _attention_forward(x, scores, query, mask, cu_seqlens, max_seqlen, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H) and stats (B, nh, 2) = softmax (m, l), both in the accumulation dtype)."""
    acc = accumulation_dtype(x.dtype)
    seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
    keep = _expand(seg.keep, x)
    xs = torch.where(keep, x.to(acc), 0)  # padding is never read
    raw = _scores(xs, scores, query, scale, acc)
    s = torch.where(_expand(seg.keep, raw), raw, float("-inf"))
    row_max = seg.amax(s, float("-inf"))  # (B, nh); -inf for an empty head
    shift = torch.where(row_max == float("-inf"), 0, row_max)
    p = torch.exp(s - seg.per_token(shift))  # 0 where the score is -inf; NaN or +inf: l is NaN
    den = seg.sum(p)
    total = seg.sum(p[..., None] * _heads(xs, s.shape[-1]))  # (B, nh, D)
    nonempty = (den != 0)[..., None]  # l == 0: every kept score -inf; a NaN l gives NaN
    out = torch.where(nonempty, total / torch.where(nonempty, den[..., None], 1), 0)
    return out.flatten(-2), torch.stack([row_max, den], -1)


def _attention_backward(grad_out, x, scores, query, mask, cu_seqlens, out, stats, scale: float):
    """(dx like x, dscores like scores or dquery like query): p = exp(s - m) / l from the given
    stats, ds = p g . (x - out), dx = p g (+ ds scale query); all 0 where l == 0 (an empty head)
    and on padding, whatever x or scale hold there."""
    acc = out.dtype
    seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
    keep = _expand(seg.keep, x)
    xs = torch.where(keep, x.to(acc), 0)
    s = _scores(xs, scores, query, scale, acc)
    row_max, den = seg.per_token(stats[..., 0]), seg.per_token(stats[..., 1])
    nonempty = _expand(seg.keep, s) & (den != 0)
    p = torch.where(
        nonempty, torch.exp(s - torch.where(nonempty, row_max, 0)) / torch.where(nonempty, den, 1), 0
    )
    num_heads = s.shape[-1]
    g = _heads(seg.per_token(grad_out.to(acc)), num_heads)
    ds = torch.where(
        nonempty, p * (g * (_heads(xs, num_heads) - _heads(seg.per_token(out), num_heads))).sum(-1), 0
    )
    dx = p[..., None] * g
    if query is None:
        return dx.flatten(-2).to(x.dtype), ds.to(scores.dtype).reshape(scores.shape)
    ds_scaled = torch.where(nonempty, ds * scale, 0)  # not 0 * inf on padding
    dx = dx + ds_scaled[..., None] * query.to(acc)
    token_dims = tuple(range(ds.dim() - 1))
    dquery = (ds_scaled[..., None] * _heads(xs, num_heads)).sum(token_dims)
    return dx.flatten(-2).to(x.dtype), dquery.to(query.dtype).reshape(query.shape)


def attention_fwd(x, scores, mask, cu_seqlens, max_seqlen) -> tuple[Tensor, Tensor]:
    return _attention_forward(x, scores, None, mask, cu_seqlens, max_seqlen, 1.0)


def attention_bwd(grad_out, x, scores, mask, cu_seqlens, out, stats) -> tuple[Tensor, Tensor]:
    return _attention_backward(grad_out, x, scores, None, mask, cu_seqlens, out, stats, 1.0)


def query_attention_fwd(x, query, mask, cu_seqlens, max_seqlen, scale: float) -> tuple[Tensor, Tensor]:
    return _attention_forward(x, None, query, mask, cu_seqlens, max_seqlen, scale)


def query_attention_bwd(grad_out, x, query, mask, cu_seqlens, out, stats, scale: float):
    return _attention_backward(grad_out, x, None, query, mask, cu_seqlens, out, stats, scale)


# --- span -----------------------------------------------------------------------------------------


def clamped_spans(spans: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """int64 (start', end') of each span: start' = min(max(start, 0), T), end' = min(max(end, start'), T)."""
    starts = spans[:, 0].long().clamp(0, num_tokens)
    ends = torch.maximum(spans[:, 1].long(), starts).clamp(max=num_tokens)
    return starts, ends


class SpanPairs:
    """Every (span, token) pair with the token inside the clamped span, span by span in increasing
    order, tokens in increasing order within a span: the token axis `Segments` gives the pool, so
    that the pool's mean and max run on spans unchanged.

    `span` / `token` (pairs,) int64; `keep`, `index` (t - start'), `weight` per pair as in Segments.
    Building it reads the number of pairs (the sum of the span lengths) back to the host once: the
    one host sync of this backend. Its temporaries are (pairs, H): the spans' total length, not T.
    """

    def __init__(self, spans: Tensor, mask: Tensor | None, num_tokens: int, acc: torch.dtype):
        self.num_spans = spans.shape[0]
        starts, ends = clamped_spans(spans, num_tokens)
        self.lengths = ends - starts
        num_pairs = int(self.lengths.sum()) if self.num_spans else 0  # host sync
        spans_ids = torch.arange(self.num_spans, device=spans.device)
        self.span = torch.repeat_interleave(spans_ids, self.lengths, output_size=num_pairs)
        first_pair = torch.cumsum(self.lengths, 0) - self.lengths
        self.index = torch.arange(num_pairs, device=spans.device) - first_pair[self.span]
        self.token = starts[self.span] + self.index
        kept = None if mask is None else mask[self.token]
        self.keep = torch.ones_like(self.token, dtype=torch.bool) if kept is None else kept != 0
        if kept is not None and kept.is_floating_point():
            self.weight = torch.where(self.keep, kept.to(acc), 0)
        else:
            self.weight = self.keep.to(acc)

    def per_token(self, per_span: Tensor) -> Tensor:
        """(S, ...) -> (pairs, ...): each pair gets its span's value."""
        return per_span[self.span]

    def sum(self, per_pair: Tensor) -> Tensor:
        """(pairs, ...) -> (S, ...): each span's pairs summed in order (deterministic on any device)."""
        if per_pair.shape[0] == 0:
            return per_pair.new_zeros(self.num_spans, *per_pair.shape[1:])
        return torch.segment_reduce(per_pair, "sum", lengths=self.lengths, axis=0, unsafe=True)

    def _extreme(self, per_pair: Tensor, fill, reduce: str) -> Tensor:
        index = self.span.view(-1, *([1] * (per_pair.dim() - 1))).expand_as(per_pair)
        out = per_pair.new_full((self.num_spans, *per_pair.shape[1:]), fill)
        return out.scatter_reduce_(0, index, per_pair, reduce, include_self=True)

    def amax(self, per_pair: Tensor, fill) -> Tensor:
        return self._extreme(per_pair, fill, "amax")

    def amin(self, per_pair: Tensor, fill) -> Tensor:
        return self._extreme(per_pair, fill, "amin")


def span_fwd(x: Tensor, spans: Tensor, mask, mode: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out (S, H or 2H) in x.dtype, den (S,) if mean else empty, int32 argmax (S, H) within the
    clamped span if max else empty). Only the tokens inside some span are read."""
    acc = accumulation_dtype(x.dtype)
    pairs = SpanPairs(spans, mask, x.shape[0], acc)
    xs = x[pairs.token]  # (pairs, H)
    parts, den, argmax = [], x.new_empty(0, dtype=acc), x.new_empty(0, dtype=torch.int32)
    if mode & MEAN:
        mean, den = _mean(xs, pairs, acc, False)
        parts.append(mean)
    if mode & MAX:
        maximum, argmax = _max(xs, pairs)
        parts.append(maximum)
    return torch.cat(parts, -1).to(x.dtype).contiguous(), den, argmax


def span_bwd(grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode: int) -> Tensor:
    """dx (T, H) in x_dtype: per token, the sum over the spans holding it, in increasing span order,
    of w g / den[span] (mean) and g where the token is argmax[span] (max); 0 outside every span."""
    acc = accumulation_dtype(x_dtype)
    num_tokens, hidden = x_shape
    pairs = SpanPairs(spans, mask, num_tokens, acc)
    grad = pairs.per_token(grad_out.to(acc))
    keep = _expand(pairs.keep, grad)
    per_pair = grad.new_zeros(pairs.token.shape[0], hidden)
    if mode & MEAN:
        inverse = torch.where(den != 0, 1 / torch.where(den != 0, den, 1), 0)
        per_pair += torch.where(
            keep, grad[:, :hidden] * _expand(pairs.weight * pairs.per_token(inverse), grad), 0
        )
    if mode & MAX:
        winner = pairs.per_token(argmax.long()) == _expand(pairs.index, per_pair)
        per_pair += torch.where(keep & winner, grad[:, -hidden:], 0)
    # Each token's pairs, gathered in increasing span order (a stable sort), then summed in order.
    order = torch.sort(pairs.token, stable=True).indices
    per_token = torch.bincount(pairs.token, minlength=num_tokens)
    if order.shape[0] == 0:
        return torch.zeros(x_shape, dtype=x_dtype, device=grad_out.device)
    dx = torch.segment_reduce(per_pair[order], "sum", lengths=per_token, axis=0, unsafe=True)
    return dx.to(x_dtype)
