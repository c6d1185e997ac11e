"""Benchmark shapes and their inputs.

Padded cases keep a `kept_fraction` of the tokens, right-padded, with lengths spread uniformly
around the mean. Varlen cases draw lengths from a lognormal (mean ~200 tokens, clipped to
[1, max_len]) until the total reaches `total_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPS = ("masked_mean", "masked_max", "masked_mean_max", "attention_pool", "query_attention_pool", "span_pool")
SPAN_OPS = ("span_pool",)  # varlen cases only: the spans are the packed sequences (a partition of T)
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    layout: str  # "padded" or "varlen"
    batch: int  # B (varlen: set by the lengths drawn)
    length: int  # L (varlen: the longest allowed sequence)
    hidden: int
    kept_fraction: float = 1.0  # padded only
    total_tokens: int = 0  # varlen only
    heads: int = 1  # attention heads
    tag: str = ""  # e.g. "tiny": also report per-call wall-clock latency

    def label(self) -> str:
        if self.layout == "varlen":
            return f"varlen T~{self.total_tokens // 1000}k H={self.hidden}"
        return f"B={self.batch} L={self.length} H={self.hidden} kept={self.kept_fraction:.0%}"


def full_sweep() -> list[Case]:
    """The shapes that matter to users (GPU sweep)."""
    cases = [
        Case("padded", 32, 512, hidden, kept) for hidden in (768, 1024, 4096) for kept in (1.0, 0.7, 0.4)
    ]
    cases += [
        Case("padded", 256, 64, 384, 0.7),
        Case("padded", 1, 131072, 4096, 1.0),
        Case("varlen", 0, 4096, 1024, total_tokens=500_000),
        Case("varlen", 0, 4096, 4096, total_tokens=500_000),
        Case("padded", 8, 128, 768, 0.7, tag="tiny"),
    ]
    return cases


def quick_sweep() -> list[Case]:
    """A small sweep for a 2-core CPU machine (the README's main command)."""
    return [
        Case("padded", 32, 256, 768, 0.7),  # the CPU target shape of the project's issue #4
        Case("varlen", 0, 1024, 384, total_tokens=16_000),
        Case("padded", 8, 128, 768, 0.7, tag="tiny"),
    ]


@dataclass
class Inputs:
    """One case's tensors. Padded: x (B, L, H), mask (B, L) bool; varlen: x (T, H), cu_seqlens."""

    x: torch.Tensor
    mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    lengths: torch.Tensor  # (B,) kept tokens per sequence
    scores: torch.Tensor  # (B, L) / (T,), or (..., nh)
    query: torch.Tensor  # (H,) or (nh, H/nh)
    max_seqlen: int

    @property
    def kept_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def spans(self) -> torch.Tensor:
        """(B, 2) [start, end) of each packed sequence (varlen): span_pool's spans, a partition."""
        return torch.stack([self.cu_seqlens[:-1], self.cu_seqlens[1:]], 1)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        """Token positions of x: B * L padded, T varlen."""
        return self.x.shape[0] * self.x.shape[1] if self.mask is not None else self.x.shape[0]


def _padded_lengths(batch: int, length: int, kept: float, gen: torch.Generator) -> torch.Tensor:
    """Lengths uniform around kept * L (spread as wide as [1, L] allows), mean kept * L."""
    mean = kept * length
    half_width = min(mean - 1, length - mean)
    lengths = mean + half_width * (2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1)
    return lengths.round().clamp(1, length).long()


def _varlen_lengths(total: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    sigma = 1.0
    mu = math.log(200) - sigma**2 / 2  # lognormal with mean 200
    lengths = []
    while sum(lengths) < total:
        draw = torch.empty(1024, dtype=torch.float64).log_normal_(mu, sigma, generator=gen)
        lengths += draw.round().clamp(1, max_len).long().tolist()
    lengths = torch.tensor(lengths)
    return lengths[: int((lengths.cumsum(0) < total).sum()) + 1]


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    hidden = case.hidden
    if case.layout == "padded":
        lengths = _padded_lengths(case.batch, case.length, case.kept_fraction, gen)
        x = torch.randn(case.batch, case.length, hidden, generator=gen, dtype=dtype)
        mask = torch.arange(case.length) < lengths[:, None]
        cu_seqlens = None
        token_shape = (case.batch, case.length)
        max_seqlen = case.length
    else:
        lengths = _varlen_lengths(case.total_tokens, case.length, gen)
        x = torch.randn(int(lengths.sum()), hidden, generator=gen, dtype=dtype)
        mask = None
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
        token_shape = (x.shape[0],)
        max_seqlen = int(lengths.max())
    heads = case.heads
    scores = torch.randn(*token_shape, *((heads,) if heads > 1 else ()), generator=gen, dtype=dtype)
    query = torch.randn(*((heads,) if heads > 1 else ()), hidden // heads, generator=gen, dtype=dtype)
    move = lambda t: None if t is None else t.to(device)
    return Inputs(move(x), move(mask), move(cu_seqlens), lengths, move(scores), move(query), max_seqlen)
