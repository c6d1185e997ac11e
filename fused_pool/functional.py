"""Public pooling functions: check the arguments, pick a backend, run it through the one
dispatch point (fused_pool.ops.run), whatever the backend ("torch" included). first_token /
last_token (a gather on every backend) live in fused_pool.tokens.

Shapes: padded x (B, L, H) with an optional (B, L) mask (bool / integer: keep where nonzero;
floating: per-token weights for masked_mean, keep where nonzero elsewhere); varlen x (T, H) or
(1, T, H) with cu_seqlens (B + 1,) int32/int64 and no mask (masked_mean alone takes per-token
weights (T,) there). Every op returns (B, H) (mean_max: (B, 2H)), contiguous, in x's dtype. A
sequence with no kept token pools to 0 with zero gradients.

Attention pooling takes scores (B, L) / (T,) for one head or (B, L, nh) / (T, nh) for nh heads
(head k pools channels [k H/nh, (k+1) H/nh)), or a learned query (H,) / (nh, H/nh) whose scores
(x_head . query_head) * scale are computed inside the kernel.

probe_attention_pool pools every channel once per learned probe (P, H) -> (B, P, H); linear_pool
projects, activates and pools -> (B, N) without building the (tokens, N) projection.

span_pool pools token spans [start, end) of x (T, H) (or (B, L, H) numbered t = b L + l) into
(S, H) (mean_max: (S, 2H)): spans may overlap, nest, repeat, be empty or leave gaps.
"""

from __future__ import annotations

from torch import Tensor

from ._checks import (
    check_linear_inputs,
    check_pool_inputs,
    check_probes,
    check_query,
    check_scores,
    check_span_inputs,
    max_seqlen_hint,
    scale_or_default,
)
from .backends import resolve_backend
from .contract import ACTIVATIONS, MAX, MEAN, MEAN_MAX, SUM
from .ops import run
from .tokens import first_token, last_token

__all__ = [
    "attention_pool",
    "first_token",
    "last_token",
    "linear_pool",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "probe_attention_pool",
    "query_attention_pool",
    "span_pool",
]


def _checked_tokens(x, mask, cu_seqlens, max_seqlen, varlen_weights=False) -> tuple[Tensor, int | None]:
    """check_pool_inputs' x ((B, L, H) or (T, H)) and the max_seqlen hint the kernels get."""
    x = check_pool_inputs(x, mask, cu_seqlens, max_seqlen, varlen_weights)
    return x, max_seqlen_hint(max_seqlen, x)


def _pool(x, mask, cu_seqlens, max_seqlen, backend, mode) -> Tensor:
    x, max_seqlen = _checked_tokens(x, mask, cu_seqlens, max_seqlen, varlen_weights=mode == MEAN)
    return run("pool", resolve_backend(backend, x.device), x, mask, cu_seqlens, max_seqlen, mode)


def masked_mean(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Mean of the kept tokens of each sequence: (B, L, H) + (B, L) mask, or (T, H) + cu_seqlens,
    -> (B, H). A floating mask gives the weighted mean sum(w x) / sum(w): (B, L) padded, or per-token
    weights (T,) with cu_seqlens."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MEAN)


def masked_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Max over the kept tokens of each sequence -> (B, H). The gradient goes to the first maximal
    kept token; a kept NaN propagates, as in torch.max."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MAX)


def masked_mean_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """cat(masked_mean, masked_max) -> (B, 2H), both from one read of x."""
    return _pool(x, mask, cu_seqlens, max_seqlen, backend, MEAN_MAX)


def attention_pool(
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Softmax(scores)-weighted sum of each sequence's kept tokens -> (B, H).

    scores: (B, L) or (B, L, nh) padded, (T,) or (T, nh) varlen, any floating dtype; head k pools
    channels [k H/nh, (k+1) H/nh). Softmax statistics are float32. A sequence with no kept token,
    or whose kept scores are all -inf, pools to 0 with zero gradients. Otherwise the weights are
    torch.softmax of the head's kept scores and out = sum(p x): a NaN or +inf kept score makes the
    head's output and its kept tokens' gradients NaN, and a kept NaN token its channel. Gradients
    flow to x and scores.
    """
    x, max_seqlen = _checked_tokens(x, mask, cu_seqlens, max_seqlen)
    check_scores(scores, x, cu_seqlens is not None)
    if scores.dim() == x.dim() - 1:  # one head: (B, L) -> (B, L, 1), (T,) -> (T, 1)
        scores = scores.unsqueeze(-1)
    out = run("attention", resolve_backend(backend, x.device), x, scores, mask, cu_seqlens, max_seqlen)
    return out.to(x.dtype)


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
    """Attention pooling with a learned query -> (B, H): scores (x_head . query_head) * scale,
    computed inside the kernel, softmax over each sequence's kept tokens, weighted sum.

    query: (H,) for one head or (nh, H/nh); scale defaults to 1/sqrt(H/nh) (H = 0: (B, 0) out).
    Non-finite scores follow torch.softmax as in attention_pool: a kept NaN token, or a nan / inf
    scale, makes the head NaN; a head whose kept scores are all -inf pools to 0. Gradients flow to
    x and query (dquery summed over every sequence and token in a fixed order: deterministic).
    """
    x, max_seqlen = _checked_tokens(x, mask, cu_seqlens, max_seqlen)
    num_heads = check_query(query, x)
    head_dim = x.shape[-1] // num_heads
    scale = scale_or_default(scale, head_dim)
    query = query.view(num_heads, head_dim)
    backend = resolve_backend(backend, x.device)
    out = run("query_attention", backend, x, query, mask, cu_seqlens, max_seqlen, scale)
    return out.to(x.dtype)


_SPAN_MODES = {"mean": MEAN, "max": MAX, "mean_max": MEAN_MAX}


def span_pool(
    x: Tensor,
    spans: Tensor,
    mask: Tensor | None = None,
    *,
    mode: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """Pools each token span of x -> (S, H), or (S, 2H) = cat(mean, max) for mode="mean_max".

    x: (T, H), or (B, L, H) whose tokens are numbered in flattened order t = b L + l. spans: (S, 2)
    int32 / int64 half-open [start, end) token offsets; they may overlap, nest, repeat, be empty or
    leave gaps (tokens outside every span are never read). Malformed spans are clamped, never read
    or written out of bounds: start' = min(max(start, 0), T), end' = min(max(end, start'), T).
    mask: None, (T,) or (B, L); bool / integer keep where nonzero, floating weights the mean
    (sum(w x) / sum(w)) and keeps w != 0 for the max. mode: "mean", "max" or "mean_max".
    Accumulates in float32 (float64 for float64 x); the output is in x's dtype; a span with no kept
    token pools to 0 with zero gradients. Gradients flow to x, deterministic where spans overlap
    (no float atomics); max sends each gradient to the first maximal kept token of the span.
    """
    x, mask = check_span_inputs(x, spans, mask, mode)
    return run("span", resolve_backend(backend, x.device), x, spans, mask, _SPAN_MODES[mode])


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
    """Attention pooling of every channel with each learned probe -> (B, P, H).

    probes: (P, H), 1 <= P <= 256. s[p, t] = scale * (probes[p] . x_t) over all H channels (scale
    defaults to 1/sqrt(H)); out[b, p] = sum_t softmax_t(s[p]) x_t over the kept tokens. The heads of
    an attention-pooling block with key / value projections fold into this op (fused_pool.nn.MAPHead).
    Non-finite scores follow torch.softmax as in attention_pool; a sequence with no kept token pools
    to 0. Gradients flow to x and probes (dprobes summed in a fixed order: deterministic).
    """
    x, max_seqlen = _checked_tokens(x, mask, cu_seqlens, max_seqlen)
    check_probes(probes, x)
    scale = scale_or_default(scale, x.shape[-1])
    backend = resolve_backend(backend, x.device)
    out = run("probe_attention", backend, x, probes, mask, cu_seqlens, max_seqlen, scale)
    return out.to(x.dtype)


_LINEAR_MODES = {"max": MAX, "sum": SUM, "mean": MEAN}


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
    """pool(activation(x @ weight.T + bias)) over each sequence's kept tokens -> (B, N), without ever
    building the (tokens, N) projection (SPLADE: activation="log1p_relu", mode "max" or "sum").

    weight (N, H) and bias (N,) or None as nn.Linear stores them, in x's dtype. mode: "max", "sum"
    or "mean"; a floating mask (B, L), or per-token weights (T,) with cu_seqlens, weights "sum" and
    "mean", and "max" keeps w != 0. activation: None, "relu", "log1p_relu" (log(1 + relu z)),
    "log1p_log1p_relu", "gelu" (erf form), "tanh" or "silu". Accumulates in float32 (float64 for
    float64 x); output in x's dtype; a sequence with no kept token pools to 0. "max" sends each
    gradient to the first maximal kept token. Gradients flow to x, weight and bias, deterministic.
    """
    x, max_seqlen = _checked_tokens(x, mask, cu_seqlens, max_seqlen, varlen_weights=True)
    check_linear_inputs(x, weight, bias, mode, activation)
    code = ACTIVATIONS.index(activation or "none")
    backend = resolve_backend(backend, x.device)
    return run("linear", backend, x, weight, bias, mask, cu_seqlens, max_seqlen, _LINEAR_MODES[mode], code)
