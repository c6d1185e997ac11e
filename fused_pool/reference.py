"""Plain PyTorch reference for every op: the oracle that every backend is checked against.

Written for clarity, not speed, with the same signatures as the public functions (inputs are
assumed valid: the public functions check them). Every semantic rule of the library lives here:

- accumulate in float32 (float64 for float64 inputs); softmax statistics in float32;
- padding is never read: positions that are not kept contribute nothing, even if they hold NaN;
- a floating mask weights `masked_mean` (sum(w * x) / sum(w)); every other op keeps w != 0;
  varlen `masked_mean` takes per-token weights (T,) as its mask;
- a sequence with no kept token gives 0 and zero gradients; in attention pooling, kept positions
  whose scores are all -inf count as empty; otherwise the weights are torch.softmax of the kept
  scores, NaN for the whole head if a kept score is NaN or +inf, and the output is sum(p * x);
- `masked_max` sends its gradient to the first (lowest position) maximal kept token; a kept NaN
  wins, as in `torch.max`;
- the mask never receives a gradient.

`probe_attention_pool` is query attention with P probes over all H channels, one (B, P, H) output
per probe. `linear_pool` pools act(x W^T + b) as masked_mean / masked_max pool x (sum: the weighted
sum, not divided); this reference builds the (B, L, N) projection that the kernels never build.

`span_pool` pools each span [start, end) of the tokens (clamped to [0, T]) as one sequence: spans may
overlap, nest, repeat, be empty or leave gaps, and tokens outside every span are never read.

One difference from the fused paths: for varlen inputs the reference reads the sequence lengths
back to the host to build a padded view. The fused paths never do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import ACTIVATION_FUNCTIONS as _ACTIVATION_FUNCTIONS
from .contract import accumulation_dtype as _accumulation_dtype

__all__ = [
    "masked_mean",
    "masked_max",
    "masked_mean_max",
    "attention_pool",
    "query_attention_pool",
    "probe_attention_pool",
    "linear_pool",
    "first_token",
    "last_token",
    "span_pool",
]


def _segment_bounds(cu_seqlens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """[start, end) of each sequence, clamped to [0, num_tokens] as every kernel clamps them."""
    starts = cu_seqlens[:-1].long().clamp(0, num_tokens)
    ends = torch.maximum(cu_seqlens[1:].long(), starts).clamp(max=num_tokens)
    return starts, ends


def _padded_view(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, *per_token: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Hidden states as (B, L, H), the (B, L) mask and the per-token tensors as (B, L, ...).

    Varlen inputs are gathered into a padded layout whose mask marks each sequence's tokens.
    """
    if cu_seqlens is None:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask, list(per_token)
    x = x.reshape(x.shape[-2], x.shape[-1])  # (1, T, H) -> (T, H)
    num_tokens = x.shape[0]
    starts, ends = _segment_bounds(cu_seqlens, num_tokens)
    max_len = int((ends - starts).max()) if starts.numel() else 0  # host sync: reference only
    positions = starts[:, None] + torch.arange(max_len, device=x.device)
    mask = positions < ends[:, None]
    positions = positions.clamp(max=max(num_tokens - 1, 0))
    if num_tokens == 0:  # nothing to gather from; every sequence is empty
        return (
            x.new_zeros(len(starts), max_len, x.shape[1]),
            mask,
            [t.new_zeros(len(starts), max_len, *t.shape[1:]) for t in per_token],
        )
    return x[positions], mask, [t[positions] for t in per_token]


def _kept(mask: Tensor) -> Tensor:
    return mask != 0


def _token_weights(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(xs (B, L, H), weights (B, L) in the accumulation dtype) for the ops that a floating mask
    weights: its values (padded (B, L), or varlen per-token (T,)), else 1 where kept, 0 elsewhere."""
    acc = _accumulation_dtype(x.dtype)
    if cu_seqlens is not None and mask is not None:  # varlen per-token weights (T,)
        xs, inside, (token_weights,) = _padded_view(x, None, cu_seqlens, mask)
        mask = torch.where(inside, token_weights, 0)
    else:
        xs, mask, _ = _padded_view(x, mask, cu_seqlens)
    return xs, mask.detach().to(acc) if mask.is_floating_point() else _kept(mask).to(acc)


def _weighted_mean(total: Tensor, weights: Tensor) -> Tensor:
    """total (B, ...) / the sum of each sequence's weights (B, L); 0 where that sum is 0."""
    den = weights.sum(1, keepdim=True)
    nonzero = den != 0
    return torch.where(nonzero, total / torch.where(nonzero, den, 1), 0)


def masked_mean(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, H) mean of the kept tokens; a floating mask gives the weighted mean sum(w x) / sum(w):
    (B, L) padded, or per-token weights (T,) with cu_seqlens."""
    xs, weights = _token_weights(x, mask, cu_seqlens)
    kept = weights != 0
    weighted = torch.where(kept[..., None], xs.to(weights.dtype) * weights[..., None], 0)
    return _weighted_mean(weighted.sum(1), weights).to(x.dtype)


def _first_max_position(values: Tensor, kept: Tensor) -> Tensor:
    """(B, H) position along dim 1 of the first maximal kept value; a kept NaN wins over numbers."""
    kept = kept[..., None].expand_as(values)
    is_nan = kept & values.isnan()
    candidates = torch.where(kept & ~is_nan, values, float("-inf"))
    is_max = kept & ~is_nan & (values == candidates.amax(1, keepdim=True))
    first_max = is_max.int().argmax(1)  # argmax returns the first of equal maxima
    first_nan = is_nan.int().argmax(1)
    return torch.where(is_nan.any(1), first_nan, first_max)


def masked_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, H) maximum over the kept tokens; the gradient goes to the first maximal token."""
    xs, mask, _ = _padded_view(x, mask, cu_seqlens)
    kept = _kept(mask)
    values = xs.to(_accumulation_dtype(x.dtype))
    if values.shape[1] == 0:  # no positions at all: every sequence is empty
        return (values.sum(1) * 0).to(x.dtype)
    position = _first_max_position(values.detach(), kept)
    picked = values.gather(1, position[:, None, :]).squeeze(1)
    nonempty = kept.any(1, keepdim=True)
    return torch.where(nonempty, picked, 0).to(x.dtype)


def masked_mean_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, 2H): cat(masked_mean, masked_max)."""
    mean = masked_mean(x, mask, cu_seqlens=cu_seqlens)
    maximum = masked_max(x, mask, cu_seqlens=cu_seqlens)
    return torch.cat([mean, maximum], dim=-1)


def _softmax_over_tokens(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(p, empty): torch.softmax over dim 1 of scores (B, L, heads), -inf where not kept; `empty`
    (B, heads) marks the heads whose scores are all -inf (also with no positions at all), whose p is
    any finite value (the callers zero their output)."""
    empty = (scores == float("-inf")).all(1)
    return torch.softmax(torch.where(empty[:, None], 0, scores), dim=1), empty


def _counted_scores(dots: Tensor, kept: Tensor, scale: float) -> Tensor:
    """dots (B, L, heads) * scale where a score counts, -inf elsewhere: on the kept tokens of heads
    not empty (some kept score above -inf). A nan / inf scale must reach neither padding nor an empty
    head, not even as 0 * inf in autograd."""
    above_minus_inf = kept[..., None] & (dots.detach() * scale != float("-inf"))
    counts = kept[..., None] & above_minus_inf.any(1, keepdim=True)
    return torch.full_like(dots, float("-inf")).index_put((counts,), dots[counts] * scale)


def _softmax_pool(xs: Tensor, scores: Tensor, kept: Tensor) -> Tensor:
    """Per head k: sum_l p_l * xs[:, l, head k channels], p = torch.softmax of the kept scores.

    xs: (B, L, H) in the accumulation dtype, zero where not kept; scores: (B, L, nh); kept: (B, L).
    A head whose kept scores are all -inf (or that has no kept token) is empty: 0, zero gradients.
    Otherwise p is exactly torch.softmax's: a NaN or +inf kept score makes every p of the head NaN.
    """
    batch, length, hidden = xs.shape
    num_heads = scores.shape[-1]
    p, empty = _softmax_over_tokens(torch.where(kept[..., None], scores, float("-inf")))
    heads = xs.reshape(batch, length, num_heads, hidden // num_heads)
    pooled = (p[..., None] * heads).sum(1)  # (B, nh, D)
    return torch.where(empty[..., None], 0, pooled).reshape(batch, hidden)


def attention_pool(
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, H) softmax(scores)-weighted sum of the kept tokens, per head.

    scores: (B, L) or (B, L, nh) padded, (T,) or (T, nh) varlen; head k pools channels
    [k H/nh, (k+1) H/nh).
    """
    acc = _accumulation_dtype(x.dtype)
    one_head = scores.dim() == (2 if cu_seqlens is None else 1)
    xs, mask, (scores,) = _padded_view(x, mask, cu_seqlens, scores)
    kept = _kept(mask)
    scores = scores.to(acc)
    if one_head:
        scores = scores[..., None]
    xs = torch.where(kept[..., None], xs.to(acc), 0)
    return _softmax_pool(xs, scores, kept).to(x.dtype)


def query_attention_pool(
    x: Tensor,
    query: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, H) attention pooling with scores (x_head . query_head) * scale.

    query: (H,) for one head or (nh, H/nh); scale defaults to 1/sqrt(H/nh).
    """
    acc = _accumulation_dtype(x.dtype)
    xs, mask, _ = _padded_view(x, mask, cu_seqlens)
    kept = _kept(mask)
    batch, length, hidden = xs.shape
    query = (query if query.dim() == 2 else query[None]).to(acc)  # (nh, D)
    num_heads, head_dim = query.shape
    if scale is None:
        scale = head_dim**-0.5 if head_dim else 1.0  # H = 0: no channel, any scale
    xs = torch.where(kept[..., None], xs.to(acc), 0)
    dots = (xs.reshape(batch, length, num_heads, head_dim) * query).sum(-1)  # (B, L, nh)
    return _softmax_pool(xs, _counted_scores(dots, kept, scale), kept).to(x.dtype)


def probe_attention_pool(
    x: Tensor,
    probes: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, P, H): for each probe p, softmax over the kept tokens of scale * (probes[p] . x_t), then the
    weighted sum of the tokens. scale defaults to 1/sqrt(H)."""
    acc = _accumulation_dtype(x.dtype)
    xs, mask, _ = _padded_view(x, mask, cu_seqlens)
    kept = _kept(mask)
    hidden = xs.shape[-1]
    if scale is None:
        scale = hidden**-0.5 if hidden else 1.0
    xs = torch.where(kept[..., None], xs.to(acc), 0)
    dots = xs @ probes.to(acc).T  # (B, L, P)
    p, empty = _softmax_over_tokens(_counted_scores(dots, kept, scale))  # (B, L, P), (B, P)
    pooled = p.transpose(1, 2) @ xs  # (B, P, H)
    return torch.where(empty[..., None], 0, pooled).to(x.dtype)


def linear_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    mode: str = "max",
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """(B, N): "max", "sum" (sum of w a) or "mean" (sum of w a / sum of w) over the kept tokens of
    a = activation(x @ weight.T + bias). A floating mask weights sum / mean, max keeps w != 0."""
    xs, weights = _token_weights(x, mask, cu_seqlens)
    acc, kept = weights.dtype, weights != 0
    act = _ACTIVATION_FUNCTIONS[activation or "none"]
    xs = torch.where(kept[..., None], xs.to(acc), 0)
    z = xs @ weight.to(acc).T  # (B, L, N)
    if bias is not None:
        z = z + bias.to(acc)
    values = act(z)
    if mode == "max":
        if values.shape[1] == 0:  # no positions at all: every sequence is empty
            return (values.sum(1) * 0).to(x.dtype)
        position = _first_max_position(values.detach(), kept)  # (B, N)
        # The winners' values recomputed from their rows, so that the gradient reaches only them:
        # the (B, L, N) product's backward would also spread 0 * NaN (or 0 * inf) from the others.
        winners = xs.gather(1, position[..., None].expand(-1, -1, xs.shape[-1]))  # (B, N, H)
        z = (winners * weight.to(acc)).sum(-1)
        picked = act(z if bias is None else z + bias.to(acc))
        return torch.where(kept.any(1, keepdim=True), picked, 0).to(x.dtype)
    total = torch.where(kept[..., None], values * weights[..., None], 0).sum(1)
    return (total if mode == "sum" else _weighted_mean(total, weights)).to(x.dtype)


def _kept_token(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, which: str) -> Tensor:
    """(B, H): the first / last kept token of each sequence, 0 if it has none."""
    xs, mask, _ = _padded_view(x, mask, cu_seqlens)
    kept = _kept(mask)
    count = kept.long().cumsum(1)  # kept tokens so far: 1 at the first kept token
    if which == "first":
        chosen = kept & (count == 1)
    else:
        chosen = kept & (count == count[:, -1:])
    out = torch.where(chosen[..., None], xs, 0).sum(1)
    return out + x.sum() * 0 if x.numel() == 0 else out  # no token at all: still a function of x


def first_token(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """(B, H): the first kept token of each sequence (0 if none); its gradient goes to that token."""
    return _kept_token(x, mask, cu_seqlens, "first")


def last_token(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """(B, H): the last kept token of each sequence (0 if none); its gradient goes to that token."""
    return _kept_token(x, mask, cu_seqlens, "last")


def span_pool(x: Tensor, spans: Tensor, mask: Tensor | None = None, *, mode: str = "mean") -> Tensor:
    """(S, H) ("mean_max": (S, 2H)) pooled tokens of each span, one span at a time.

    x: (T, H), or (B, L, H) whose tokens are numbered t = b L + l; spans (S, 2) half-open
    [start, end), clamped to start' = min(max(start, 0), T), end' = min(max(end, start'), T); mask
    (T,) or (B, L). Each span pools its kept tokens as masked_mean / masked_max pool a sequence.
    Reads the spans back to the host: reference only.
    """
    hidden = x.shape[-1]
    tokens = x if x.dim() == 2 else x.flatten(0, 1)
    num_tokens = tokens.shape[0]
    weights = None if mask is None else mask.reshape(-1)
    pooled = []
    for start, end in spans.tolist():
        start = min(max(start, 0), num_tokens)
        end = min(max(end, start), num_tokens)
        span_x = tokens[start:end][None]  # (1, length, H): one sequence
        span_mask = None if weights is None else weights[start:end][None]
        if mode == "mean":
            pooled.append(masked_mean(span_x, span_mask))
        elif mode == "max":
            pooled.append(masked_max(span_x, span_mask))
        else:
            pooled.append(masked_mean_max(span_x, span_mask))
    if not pooled:
        width = 2 * hidden if mode == "mean_max" else hidden
        return (tokens.sum() * 0).expand(0, width).to(x.dtype).contiguous()
    return torch.cat(pooled)
