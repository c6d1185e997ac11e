"""probe_attention_pool's "torch" backend: `probe_attention_fwd` / `probe_attention_bwd`
(fused_pool.specs PROBE_ATTENTION) in plain PyTorch, on the token axis of fused_pool.torch_kernels'
`Segments`, with the softmax rules of the attention kernels there. Padded batches run as batched
matrix products; varlen ones hold (T, P, H) temporaries. No host sync; deterministic on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import accumulation_dtype
from .torch_kernels import Segments


def _with_probe_axis(flags: Tensor) -> Tensor:
    return flags[..., None]


def _dot_per_seq(xs: Tensor, per_seq: Tensor, seg: Segments) -> Tensor:
    """(tokens, P): each token's x . per_seq[its sequence, p], per_seq (B, P, H)."""
    if seg.varlen:
        return (xs[:, None, :] * seg.per_token(per_seq)).sum(-1)
    return torch.einsum("blh,bph->blp", xs, per_seq)


def _sum_per_seq(p: Tensor, xs: Tensor, seg: Segments) -> Tensor:
    """(B, P, H): each sequence's sum over its tokens of p[token, probe] x[token]."""
    if seg.varlen:
        return seg.sum(p[..., None] * xs[:, None, :])
    return torch.einsum("blp,blh->bph", p, xs)


def probe_attention_fwd(x: Tensor, probes: Tensor, mask, cu_seqlens, max_seqlen, scale: float):
    """(out (B, P, H), stats (B, P, 2) = softmax (m, l)), both in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
    xs = torch.where(seg.keep[..., None], x.to(acc), 0)  # padding is never read
    raw = (xs @ probes.to(acc).T) * scale
    s = torch.where(_with_probe_axis(seg.keep), raw, float("-inf"))
    row_max = seg.amax(s, float("-inf"))  # (B, P); -inf for an empty probe
    shift = torch.where(row_max == float("-inf"), 0, row_max)
    p = torch.exp(s - seg.per_token(shift))  # 0 where the score is -inf; NaN or +inf: l is NaN
    den = seg.sum(p)
    total = _sum_per_seq(p, xs, seg)
    nonempty = (den != 0)[..., None]  # l == 0: every kept score -inf; a NaN l gives NaN
    out = torch.where(nonempty, total / torch.where(nonempty, den[..., None], 1), 0)
    return out, torch.stack([row_max, den], -1)


def probe_attention_bwd(grad_out, x, probes, mask, cu_seqlens, out, stats, scale: float):
    """(dx like x, dprobes like probes): p = exp(s - m) / l from the given stats, ds = p (g . x -
    g . out), dx = sum_p p g + scale ds probes, dprobes = scale sum_t ds x; 0 on padding and for an
    empty probe, whatever x or scale hold there."""
    acc = out.dtype
    seg = Segments(x.shape, mask, cu_seqlens, acc, x.device)
    xs = torch.where(seg.keep[..., None], x.to(acc), 0)
    probes_acc = probes.to(acc)
    s = (xs @ probes_acc.T) * scale
    row_max, den = seg.per_token(stats[..., 0]), seg.per_token(stats[..., 1])
    nonempty = _with_probe_axis(seg.keep) & (den != 0)
    p = torch.where(
        nonempty, torch.exp(s - torch.where(nonempty, row_max, 0)) / torch.where(nonempty, den, 1), 0
    )
    grad = grad_out.to(acc)
    dot_out = seg.per_token((grad * out).sum(-1))  # g . out per (sequence, probe)
    ds = torch.where(nonempty, p * (_dot_per_seq(xs, grad, seg) - dot_out), 0)
    ds_scaled = torch.where(nonempty, ds * scale, 0)  # not 0 * inf on padding
    if seg.varlen:
        dx = (p[..., None] * seg.per_token(grad)).sum(-2)
    else:
        dx = torch.einsum("blp,bph->blh", p, grad)
    dx = dx + ds_scaled @ probes_acc
    dprobes = ds_scaled.reshape(-1, ds.shape[-1]).T @ xs.reshape(-1, xs.shape[-1])
    return dx.to(x.dtype), dprobes.to(probes.dtype)
