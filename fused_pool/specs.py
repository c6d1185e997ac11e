"""One spec per op kind: the facts every backend of that kind shares, defined once.

A kind is a forward / backward kernel pair with one schema on every backend:

    pool:            (x, mask, cu_seqlens, max_seqlen, mode) -> (out, den, argmax)
                     backward: (grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode) -> dx
    attention:       (x, scores, mask, cu_seqlens, max_seqlen) -> (out, stats)
                     backward: (grad_out, x, scores, mask, cu_seqlens, out, stats) -> (dx, dscores)
    query_attention: (x, query, mask, cu_seqlens, max_seqlen, scale) -> (out, stats)
                     backward: (grad_out, x, query, mask, cu_seqlens, out, stats, scale) -> (dx, dquery)
    span:            (x, spans, mask, mode) -> (out, den, argmax)
                     backward: (grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode) -> dx
    linear:          (x, weight, bias, mask, cu_seqlens, max_seqlen, mode, activation) -> (out, den, argmax)
                     backward: (grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode,
                               activation) -> (dx, dweight, dbias)
    probe_attention: (x, probes, mask, cu_seqlens, max_seqlen, scale) -> (out, stats)
                     backward: (grad_out, x, probes, mask, cu_seqlens, out, stats, scale) -> (dx, dprobes)

pool `mode` is MEAN, MAX or MEAN_MAX (fused_pool.contract), and a forward may add STATES: then
`out` holds the partial states (fused_pool.partials) in the accumulation dtype, its mean half the
sum of w x, not divided by den. Otherwise `out` is (B, H) (mean_max: (B, 2H)) in x's dtype; `den` is the
sum of weights per sequence (B,) in the accumulation dtype (mean modes, else empty); `argmax` is
the int32 (B, H) index of the winning token within its sequence (l padded, t - start varlen; -1 for
an empty sequence) (max modes, else empty). The pool backward computes dx = w g / den[seq] (0 where
den == 0) and dx = g where the token's index is argmax[seq, h]. A varlen mask is per-token (T,).

Span `x` is (T, H), `spans` (S, 2) int32 / int64 half-open [start, end) token offsets, each clamped
to start' = min(max(start, 0), T), end' = min(max(end, start'), T) (never an out-of-bounds access),
and `mask` None or per-token (T,). Its `out` is (S, H) (MEAN_MAX: (S, 2H)) in x's dtype (no STATES),
`den` (S,) as the pool's, `argmax` (S, H) int32 the index t - start' within the clamped span (-1 if
the span keeps no token). Its backward sums, over the spans holding a token in increasing span order,
w g / den[span] (mean) and g where t - start' is argmax[span] (max).

Linear pools a = act(x W^T + b) (weight (N, H), bias (N,) or None, both in x's dtype; `activation`
an index into contract.ACTIVATIONS) over each sequence's kept tokens, never building the (tokens, N)
projection: `mode` is MAX, SUM (sum of w a) or MEAN (sum of w a / sum of w); `out` (B, N) in x's
dtype, `den` (B,) the sum of weights in the accumulation dtype (MEAN, else empty), `argmax` (B, N)
int32 the index of the first maximal kept token within its sequence as the pool's (MAX, else empty).
Its backward returns dx (x's shape and dtype, 0 at tokens not kept), dweight (N, H) and dbias (N,)
(the gradient a bias would get, also when bias is None): MAX recomputes z only at the argmax
tokens, SUM / MEAN recompute the projection block by block. The mask is (B, L) padded or, varlen,
None or per-token weights (T,).

Attention `out` is (B, H) in the accumulation dtype (the caller casts it to x's dtype) and `stats`
the (B, nh, 2) softmax (m, l); scores are (B, L, nh) / (T, nh) and query (nh, H / nh). The backward
recomputes p = exp(s - m) / l from the stats it is given (0 where l == 0), with
ds = p g . (x - out). A varlen mask is per-token (T,) here too (the distributed ops drop padding
with it); the public single-device ops take none.

Probe attention pools every channel with each of P probes (P, H): s[p, t] = scale (probes[p] . x_t),
`out` (B, P, H) in the accumulation dtype (the caller casts it), `stats` (B, P, 2) as attention's,
backward (dx, dprobes) with dprobes summed in a fixed order; a padded (B, L) mask, varlen none.

Because every backward reads only these saved states, a caller may substitute other states for the
ones its forward returned: the distributed ops (fused_pool.distributed) run the local backward
kernels with the global states.

Each spec also says what autograd saves and how the kernel gradients map to the op's inputs
(`save`, `input_grads`) and gives the fake kernels torch.compile traces with. Data only: no kernel
is imported here. Every backend implements each kind as `<kind>_fwd` / `<kind>_bwd` with these
schemas; fused_pool.ops says which module holds them and registers them (the extension's C++ ops
`fused_pool::ext_<kind>_fwd` / `_bwd` must have the same schemas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import contract


@dataclass(frozen=True)
class OpSpec:
    kind: str
    forward_schema: str  # "(arguments) -> results", without the op's name
    backward_schema: str
    fake_forward: Callable[..., tuple[Tensor, ...]]
    fake_backward: Callable[..., Tensor | tuple[Tensor, ...]]
    save: Callable[..., None]  # setup_context(ctx, inputs, output): what backward needs
    input_grads: Callable[..., tuple]  # (ctx, backward kernel, grad_out) -> one gradient per input


# --- pool -----------------------------------------------------------------------------------------


def _pool_save(ctx, inputs, output) -> None:
    x, mask, cu_seqlens, _max_seqlen, mode = inputs
    ctx.save_for_backward(mask, cu_seqlens, output[1], output[2])
    ctx.x_shape, ctx.x_dtype, ctx.mode = list(x.shape), x.dtype, mode & contract.MEAN_MAX


def _pool_input_grads(ctx, backward, grad_out, *_unused) -> tuple:
    mask, cu_seqlens, den, argmax = ctx.saved_tensors
    dx = backward(grad_out, mask, cu_seqlens, den, argmax, ctx.x_shape, ctx.x_dtype, ctx.mode)
    return dx, None, None, None, None


def _pool_fake_forward(x, mask, cu_seqlens, max_seqlen, mode):
    batch, hidden, acc = contract.num_seqs(x, cu_seqlens), x.shape[-1], contract.accumulation_dtype(x.dtype)
    both = mode & contract.MEAN_MAX == contract.MEAN_MAX
    out = x.new_empty(batch, 2 * hidden if both else hidden, dtype=acc if mode & contract.STATES else x.dtype)
    den = x.new_empty(batch if mode & contract.MEAN else 0, dtype=acc)
    argmax = x.new_empty((batch, hidden) if mode & contract.MAX else (0,), dtype=torch.int32)
    return out, den, argmax


def _pool_fake_backward(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode):
    return grad_out.new_empty(x_shape, dtype=x_dtype)


POOL = OpSpec(
    kind="pool",
    forward_schema=(
        "(Tensor x, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen, int mode) -> (Tensor, Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_out, Tensor? mask, Tensor? cu_seqlens, Tensor den, Tensor argmax, SymInt[] x_shape,"
        " ScalarType x_dtype, int mode) -> Tensor"
    ),
    fake_forward=_pool_fake_forward,
    fake_backward=_pool_fake_backward,
    save=_pool_save,
    input_grads=_pool_input_grads,
)


# --- attention and query attention ----------------------------------------------------------------
# The second input (scores or query) gets a gradient; query attention has a trailing `scale`.


def _attention_save(ctx, inputs, output) -> None:
    x, scores_or_query, mask, cu_seqlens, _max_seqlen, *scale = inputs
    ctx.save_for_backward(x, scores_or_query, mask, cu_seqlens, *output)
    ctx.scale = scale


def _attention_input_grads(ctx, backward, grad_out, *_unused) -> tuple:
    x, scores_or_query, mask, cu_seqlens, out, stats = ctx.saved_tensors
    dx, dother = backward(grad_out, x, scores_or_query, mask, cu_seqlens, out, stats, *ctx.scale)
    return (dx, dother, None, None, None) + (None,) * len(ctx.scale)


def _attention_fake_forward(x, scores_or_query, mask, cu_seqlens, max_seqlen, *scale):
    num_heads = scores_or_query.shape[0] if scale else scores_or_query.shape[-1]
    acc, batch = contract.accumulation_dtype(x.dtype), contract.num_seqs(x, cu_seqlens)
    return x.new_empty(batch, x.shape[-1], dtype=acc), x.new_empty(batch, num_heads, 2, dtype=acc)


def _attention_fake_backward(grad_out, x, scores_or_query, mask, cu_seqlens, out, stats, *scale):
    return x.new_empty(x.shape), scores_or_query.new_empty(scores_or_query.shape)


_ATTENTION_COMMON = dict(
    fake_forward=_attention_fake_forward,
    fake_backward=_attention_fake_backward,
    save=_attention_save,
    input_grads=_attention_input_grads,
)

ATTENTION = OpSpec(
    kind="attention",
    forward_schema=(
        "(Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen) -> (Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_out, Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens, Tensor out,"
        " Tensor stats) -> (Tensor, Tensor)"
    ),
    **_ATTENTION_COMMON,
)

QUERY_ATTENTION = OpSpec(
    kind="query_attention",
    forward_schema=(
        "(Tensor x, Tensor query, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen, float scale)"
        " -> (Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_out, Tensor x, Tensor query, Tensor? mask, Tensor? cu_seqlens, Tensor out,"
        " Tensor stats, float scale) -> (Tensor, Tensor)"
    ),
    **_ATTENTION_COMMON,
)


# --- span -----------------------------------------------------------------------------------------


def _span_save(ctx, inputs, output) -> None:
    x, spans, mask, mode = inputs
    ctx.save_for_backward(spans, mask, output[1], output[2])
    ctx.x_shape, ctx.x_dtype, ctx.mode = list(x.shape), x.dtype, mode & contract.MEAN_MAX


def _span_input_grads(ctx, backward, grad_out, *_unused) -> tuple:
    spans, mask, den, argmax = ctx.saved_tensors
    dx = backward(grad_out, spans, mask, den, argmax, ctx.x_shape, ctx.x_dtype, ctx.mode)
    return dx, None, None, None


def _span_fake_forward(x, spans, mask, mode):
    num_spans, hidden, acc = spans.shape[0], x.shape[-1], contract.accumulation_dtype(x.dtype)
    both = mode & contract.MEAN_MAX == contract.MEAN_MAX
    out = x.new_empty(num_spans, 2 * hidden if both else hidden)
    den = x.new_empty(num_spans if mode & contract.MEAN else 0, dtype=acc)
    argmax = x.new_empty((num_spans, hidden) if mode & contract.MAX else (0,), dtype=torch.int32)
    return out, den, argmax


def _span_fake_backward(grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode):
    return grad_out.new_empty(x_shape, dtype=x_dtype)


SPAN = OpSpec(
    kind="span",
    forward_schema="(Tensor x, Tensor spans, Tensor? mask, int mode) -> (Tensor, Tensor, Tensor)",
    backward_schema=(
        "(Tensor grad_out, Tensor spans, Tensor? mask, Tensor den, Tensor argmax, SymInt[] x_shape,"
        " ScalarType x_dtype, int mode) -> Tensor"
    ),
    fake_forward=_span_fake_forward,
    fake_backward=_span_fake_backward,
    save=_span_save,
    input_grads=_span_input_grads,
)


# --- linear ---------------------------------------------------------------------------------------


def _linear_save(ctx, inputs, output) -> None:
    x, weight, bias, mask, cu_seqlens, _max_seqlen, mode, activation = inputs
    ctx.save_for_backward(x, weight, bias, mask, cu_seqlens, output[1], output[2])
    ctx.mode, ctx.activation, ctx.has_bias = mode, activation, bias is not None


def _linear_input_grads(ctx, backward, grad_out, *_unused) -> tuple:
    x, weight, bias, mask, cu_seqlens, den, argmax = ctx.saved_tensors
    dx, dweight, dbias = backward(
        grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, ctx.mode, ctx.activation
    )
    return dx, dweight, dbias if ctx.has_bias else None, None, None, None, None, None


def _linear_fake_forward(x, weight, bias, mask, cu_seqlens, max_seqlen, mode, activation):
    batch, features = contract.num_seqs(x, cu_seqlens), weight.shape[0]
    acc = contract.accumulation_dtype(x.dtype)
    out = x.new_empty(batch, features)
    den = x.new_empty(batch if mode & contract.MEAN else 0, dtype=acc)
    argmax = x.new_empty((batch, features) if mode & contract.MAX else (0,), dtype=torch.int32)
    return out, den, argmax


def _linear_fake_backward(grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode, activation):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


LINEAR = OpSpec(
    kind="linear",
    forward_schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen, int mode,"
        " int activation) -> (Tensor, Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? cu_seqlens,"
        " Tensor den, Tensor argmax, int mode, int activation) -> (Tensor, Tensor, Tensor)"
    ),
    fake_forward=_linear_fake_forward,
    fake_backward=_linear_fake_backward,
    save=_linear_save,
    input_grads=_linear_input_grads,
)


# --- probe attention ------------------------------------------------------------------------------
# Query attention's schema and saved states, with P probes each pooling all H channels.


def _probe_attention_fake_forward(x, probes, mask, cu_seqlens, max_seqlen, scale):
    acc, batch = contract.accumulation_dtype(x.dtype), contract.num_seqs(x, cu_seqlens)
    out = x.new_empty(batch, probes.shape[0], x.shape[-1], dtype=acc)
    return out, x.new_empty(batch, probes.shape[0], 2, dtype=acc)


PROBE_ATTENTION = OpSpec(
    kind="probe_attention",
    forward_schema=(
        "(Tensor x, Tensor probes, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen, float scale)"
        " -> (Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_out, Tensor x, Tensor probes, Tensor? mask, Tensor? cu_seqlens, Tensor out,"
        " Tensor stats, float scale) -> (Tensor, Tensor)"
    ),
    fake_forward=_probe_attention_fake_forward,
    fake_backward=_attention_fake_backward,
    save=_attention_save,
    input_grads=_attention_input_grads,
)

SPECS: dict[str, OpSpec] = {
    spec.kind: spec for spec in (POOL, ATTENTION, QUERY_ATTENTION, SPAN, LINEAR, PROBE_ATTENTION)
}
