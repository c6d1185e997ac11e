"""Who computes each op in the benchmark, side by side on identical inputs.

- fused_pool:<backend>: this library (triton / cuda / cpu, whichever run on the device);
- torch:eager: the PyTorch code users write today: the mean_pooling snippet of the
  sentence-transformers model cards on the Hugging Face Hub (expanded float mask, sum, clamped
  count), masked_fill + max, masked softmax + weighted sum; packed (varlen) inputs with the segment
  ops of sentence-transformers' flattened path (index_add, scatter_reduce);
- torch:compile: torch.compile of that same code;
- torch:segment_reduce: torch.segment_reduce over packed tokens (varlen mean / max; span_pool's
  spans partition the tokens there);
- span_pool's torch:eager is the per-span loop `torch.stack([x[a:b].mean(0) for a, b in spans])`
  (spans a host list, made once), and it has no torch:compile peer (the loop unrolls per span);
- st:pooling: sentence-transformers' Pooling module itself (padded and flattened), when installed
  (its v6 mean no longer expands the mask: cheaper than the model-card snippet).

A provider returns, for an op and inputs, a function of the differentiable tensors (x, and the
scores or query for attention) that computes the (B, H) or (B, 2H) output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from cases import Inputs
from torch import Tensor

import fused_pool

# --- the code users write today ------------------------------------------------------------------


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def eager_mean(x: Tensor, mask: Tensor) -> Tensor:
    """mean_pooling of the sentence-transformers model cards (e.g. all-MiniLM-L6-v2)."""
    input_mask_expanded = mask.unsqueeze(-1).expand(x.size()).float()
    return torch.sum(x * input_mask_expanded, 1) / torch.clamp(input_mask_expanded.sum(1), min=1e-9)


def eager_max(x: Tensor, mask: Tensor) -> Tensor:
    """masked_fill + max."""
    return x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values


def eager_mean_max(x: Tensor, mask: Tensor) -> Tensor:
    return torch.cat([eager_mean(x, mask), eager_max(x, mask)], dim=-1)


def eager_attention(x: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Masked softmax over the sequence, then the weighted sum (per head for (B, L, nh) scores)."""
    batch, length, hidden = x.shape
    scores = scores.reshape(batch, length, -1)
    weights = scores.float().masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).softmax(dim=1).to(x.dtype)
    heads = x.view(batch, length, weights.shape[-1], -1)
    return (weights.unsqueeze(-1) * heads).sum(dim=1).reshape(batch, hidden)


def eager_query_attention(x: Tensor, query: Tensor, mask: Tensor) -> Tensor:
    batch, length, hidden = x.shape
    query = query.reshape(-1, query.shape[-1])
    scores = (x.view(batch, length, *query.shape) * query).sum(-1) * query.shape[-1] ** -0.5
    return eager_attention(x, scores, mask)


def _segments(cu_seqlens: Tensor) -> Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def eager_mean_varlen(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """sentence-transformers v6 flattened path, mode "mean"."""
    seg = _segments(cu_seqlens)
    total = torch.zeros(len(cu_seqlens) - 1, x.shape[1], device=x.device, dtype=_accumulation(x.dtype))
    total = total.index_add(0, seg, x.to(total.dtype))
    count = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).unsqueeze(1).to(total.dtype)
    return (total / count).to(x.dtype)


def eager_max_varlen(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """sentence-transformers v6 flattened path, mode "max"."""
    seg = _segments(cu_seqlens).unsqueeze(1).expand(-1, x.shape[1])
    out = torch.full((len(cu_seqlens) - 1, x.shape[1]), float("-inf"), device=x.device, dtype=x.dtype)
    return out.scatter_reduce(0, seg, x, reduce="amax")


def eager_mean_max_varlen(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    return torch.cat([eager_mean_varlen(x, cu_seqlens), eager_max_varlen(x, cu_seqlens)], dim=-1)


def eager_attention_varlen(x: Tensor, scores: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Segment softmax (scatter max, exp, index_add sum) and an index_add weighted sum."""
    seg = _segments(cu_seqlens)
    num_seqs, (tokens, hidden) = len(cu_seqlens) - 1, x.shape
    scores = scores.reshape(tokens, -1).float()
    heads = scores.shape[1]
    row_max = torch.full((num_seqs, heads), float("-inf"), device=x.device)
    row_max = row_max.scatter_reduce(0, seg.unsqueeze(1).expand(-1, heads), scores, reduce="amax")
    p = torch.exp(scores - row_max[seg])
    den = torch.zeros(num_seqs, heads, device=x.device).index_add(0, seg, p)
    weights = (p / den[seg]).to(x.dtype)
    weighted = (weights.unsqueeze(-1) * x.view(tokens, heads, -1)).reshape(tokens, hidden)
    return torch.zeros(num_seqs, hidden, device=x.device, dtype=x.dtype).index_add(0, seg, weighted)


def eager_query_attention_varlen(x: Tensor, query: Tensor, cu_seqlens: Tensor) -> Tensor:
    query = query.reshape(-1, query.shape[-1])
    scores = (x.view(x.shape[0], *query.shape) * query).sum(-1) * query.shape[-1] ** -0.5
    return eager_attention_varlen(x, scores, cu_seqlens)


def eager_span_loop(x: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """The per-span loop people write for late chunking: one mean per span."""
    return torch.stack([x[start:end].mean(0) for start, end in spans])


EAGER = {
    ("masked_mean", "padded"): eager_mean,
    ("masked_max", "padded"): eager_max,
    ("masked_mean_max", "padded"): eager_mean_max,
    ("attention_pool", "padded"): eager_attention,
    ("query_attention_pool", "padded"): eager_query_attention,
    ("masked_mean", "varlen"): eager_mean_varlen,
    ("masked_max", "varlen"): eager_max_varlen,
    ("masked_mean_max", "varlen"): eager_mean_max_varlen,
    ("attention_pool", "varlen"): eager_attention_varlen,
    ("query_attention_pool", "varlen"): eager_query_attention_varlen,
}


@functools.cache
def _compiled(op: str, layout: str, grad: bool) -> Callable:
    # One compiled function per (op, layout, grad mode) so that inference and training graphs do
    # not recompile each other; dynamic shapes across the sweep. The "bwd" mode re-runs one graph's
    # backward (retain_graph=True), which compiled graphs with donated buffers refuse.
    del grad
    torch._functorch.config.donated_buffer = False
    return torch.compile(EAGER[(op, layout)], dynamic=True)


def _segment_reduce(op: str, x: Tensor, cu_seqlens: Tensor) -> Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if op == "masked_mean_max":
        return torch.cat(
            [_segment_reduce("masked_mean", x, cu_seqlens), _segment_reduce("masked_max", x, cu_seqlens)], -1
        )
    reduce = "mean" if op == "masked_mean" else "max"
    return torch.segment_reduce(x, reduce, lengths=lengths, axis=0, unsafe=True)


# --- providers -----------------------------------------------------------------------------------

ST_MODES = {"masked_mean": "mean", "masked_max": "max", "masked_mean_max": ("mean", "max")}


def _st_pooling_class():
    try:
        from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    except ImportError:
        try:
            from sentence_transformers.models import Pooling
        except ImportError:
            return None
    return Pooling


def providers(device: str) -> list[str]:
    """Provider names that can run on `device`."""
    names = [
        f"fused_pool:{b}"
        for b in fused_pool.available_backends()
        if b != "torch"
        and not (b == "triton" and device == "cpu")  # the interpreter is not a fast path
        and fused_pool.backends.unavailable_reason(b, torch.device(device)) is None
    ]
    names += ["torch:eager", "torch:compile", "torch:segment_reduce"]
    if _st_pooling_class() is not None:
        names.append("st:pooling")
    return names


def supports(provider: str, op: str, layout: str) -> bool:
    if op == "span_pool":
        return layout == "varlen" and provider not in ("torch:compile", "st:pooling")
    if provider == "torch:segment_reduce":
        return layout == "varlen" and op in ST_MODES
    if provider == "st:pooling":
        return op in ST_MODES
    return True


def build(provider: str, op: str, inputs: Inputs, grad: bool) -> Callable[..., Tensor]:
    """f(x) or f(x, scores_or_query) computing `op` on `inputs` the provider's way."""
    layout = "padded" if inputs.mask is not None else "varlen"
    structure = (inputs.mask,) if layout == "padded" else (inputs.cu_seqlens,)
    if op == "span_pool":
        return _build_span(provider, inputs)
    if provider.startswith("fused_pool:"):
        backend = provider.split(":")[1]
        fn = getattr(fused_pool, op)
        kwargs = dict(backend=backend)
        if layout == "varlen":
            kwargs.update(cu_seqlens=inputs.cu_seqlens, max_seqlen=inputs.max_seqlen)
            return lambda *t: fn(*t, **kwargs)
        return lambda *t: fn(*t, inputs.mask, **kwargs)
    if provider == "torch:eager":
        fn = EAGER[(op, layout)]
        return lambda *t: fn(*t, *structure)
    if provider == "torch:compile":
        fn = _compiled(op, layout, grad)
        return lambda *t: fn(*t, *structure)
    if provider == "torch:segment_reduce":
        return lambda x: _segment_reduce(op, x, inputs.cu_seqlens)
    if provider == "st:pooling":
        pooling = _st_pooling_class()(inputs.x.shape[-1], pooling_mode=ST_MODES[op]).to(inputs.x.device)
        if layout == "padded":
            return lambda x: pooling({"token_embeddings": x, "attention_mask": inputs.mask})[
                "sentence_embedding"
            ]
        return lambda x: pooling({"token_embeddings": x.unsqueeze(0), "cu_seq_lens_q": inputs.cu_seqlens})[
            "sentence_embedding"
        ]
    raise ValueError(provider)


def _build_span(provider: str, inputs: Inputs) -> Callable[..., Tensor]:
    """span_pool (mode "mean") over the packed sequences as spans."""
    spans = inputs.spans
    if provider.startswith("fused_pool:"):
        backend = provider.split(":")[1]
        return lambda x: fused_pool.span_pool(x, spans, backend=backend)
    if provider == "torch:eager":
        host_spans = [tuple(span) for span in spans.tolist()]
        return lambda x: eager_span_loop(x, host_spans)
    if provider == "torch:segment_reduce":
        return lambda x: _segment_reduce("masked_mean", x, inputs.cu_seqlens)
    raise ValueError(provider)
