"""The matrix of calls whose Triton specializations must compile: every public op, forward and
backward, through the public functions (their checks and argument handling included), so that
every specialization the real launchers produce is seen.

Sizes that map to the same constexpr blocks give the same specialization; the checker compiles
each distinct one once.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from fused_pool.contract import MAX, MEAN, MEAN_MAX  # imported once fused_pool is (triton_check.collect)

# Hidden size for the pool ops, head size for the attention ops (H = size * heads).
SIZES = (64, 768, 1000, 4096, 8192, 16384)
HEADS = (1, 12)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# int64 (what tokenizers give) differs from bool only in the mask pointer's type: left out for time.
MASKS = ("none", "bool", "float")
POOL_MODES = ("mean", "max", "mean_max")
# The pool forward's partial-state mode (what fused_pool.distributed runs): a smaller matrix.
STATES_OPS = ("mean_states", "max_states", "mean_max_states")
STATES_SIZES = (64, 1000, 4096)

# Split: a few long sequences (the split plan spreads each over many programs). 2048 rows split on
# every size and head count for 108 / 132 SMs. No split: short sequences, one program each.
SPLIT_LEN = 2048
SHORT_LEN = 100  # padded L; varlen: 4 sequences of 100 with the max_seqlen hint


# span_pool (op "span_<mode>"): spans over x (T, H). Split: a few spans over T = SPLIT_LEN (the
# span split plan spreads each over many programs). No split: more short spans than two waves of
# programs on any SM count and H. one_token: T = 1 and H = 1 (ints equal to 1 are specialized).
SPAN_SIZES = (1, *SIZES)
SPAN_LAYOUTS = ("spans", "one_token")
MANY_SPANS = 4096


# probe_attention_pool (op "probe_attention"): H channels (Case.size), P probes (Case.heads).
PROBE_SIZES = (768, 1152)
PROBE_COUNTS = (1, 16, 64)
PROBE_MASKS = ("none", "bool")


class Case(NamedTuple):
    op: str  # mean | max | mean_max | attention | query_attention | span_<mode> | <mode>_states |
    # linear_<mode>:<activation>:N=<features>
    layout: str  # padded | varlen; span ops: spans | one_token
    mask: str  # none | bool | float | int64 (varlen: none, or float weights where the API takes them)
    split: bool
    dtype: str
    size: int  # hidden size (pool) or head size (attention)
    heads: int

    def label(self) -> str:
        size = f"H={self.size}" if self.heads == 0 else f"D={self.size} nh={self.heads}"
        if self.op == "probe_attention":
            size = f"H={self.size} P={self.heads}"
        split = "split" if self.split else "nosplit"
        return f"{self.op} {self.layout} mask={self.mask} {split} {self.dtype} {size}"


def all_cases() -> list[Case]:
    cases = []
    for op in (*POOL_MODES, "attention", "query_attention"):
        heads = HEADS if "attention" in op else (0,)
        for layout, mask, split, dtype, size, nh in itertools.product(
            ("padded", "varlen"), MASKS, (True, False), DTYPES, SIZES, heads
        ):
            if layout == "varlen" and mask != "none" and not (op == "mean" and mask == "float"):
                continue  # varlen has no padding; only masked_mean takes a mask there (weights)
            cases.append(Case(op, layout, mask, split, dtype, size, nh))
    for mode, layout, mask, split, dtype, size in itertools.product(
        POOL_MODES, SPAN_LAYOUTS, MASKS, (True, False), DTYPES, SPAN_SIZES
    ):
        if layout == "one_token" and (split or size != 1):
            continue
        cases.append(Case(f"span_{mode}", layout, mask, split, dtype, size, 0))
    for op in STATES_OPS:
        for layout, mask, split, dtype, size in itertools.product(
            ("padded", "varlen"), ("none", "bool"), (True, False), DTYPES, STATES_SIZES
        ):
            if layout == "padded" or mask == "none":
                cases.append(Case(op, layout, mask, split, dtype, size, 0))
    cases += _probe_cases()
    cases += _linear_cases()
    return cases


def _mask(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "bool":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "int64":
        return torch.ones(shape, dtype=torch.int64)
    return torch.ones(shape, dtype=dtype)  # float: weights for the mean, keep-if-nonzero elsewhere


def inputs(case: Case):
    """(function name in fused_pool, or "pool_states": the triton pool forward with mode | STATES,
    positional args, keyword args, tensors that get a gradient).

    x is allocated, never filled: the kernels are compiled, not run (the memory stays virtual).
    """
    dtype = DTYPES[case.dtype]
    hidden = case.size if case.op == "probe_attention" else case.size * max(case.heads, 1)
    kwargs = {}
    if case.op.startswith("span_"):
        return _span_inputs(case, dtype, hidden)
    if case.op.startswith("linear_"):
        return _linear_inputs(case, dtype)
    if case.layout == "padded":
        batch, length = (1, SPLIT_LEN) if case.split else (4, SHORT_LEN)
        x = torch.empty(batch, length, hidden, dtype=dtype)
        tokens = (batch, length)
        mask = _mask(case.mask, tokens, dtype)
    else:
        if case.split:  # two long sequences, no max_seqlen hint
            lengths = [SPLIT_LEN // 2, SPLIT_LEN // 2]
        else:
            lengths = [SHORT_LEN] * 4
            kwargs["max_seqlen"] = SHORT_LEN
        total = sum(lengths)
        x = torch.empty(total, hidden, dtype=dtype)
        tokens = (total,)
        kwargs["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        mask = _mask(case.mask, tokens, dtype)
    if case.op in STATES_OPS:
        mode = {"mean_states": MEAN, "max_states": MAX, "mean_max_states": MEAN_MAX}[case.op]
        return "pool_states", (x, mask, kwargs.get("cu_seqlens"), kwargs.get("max_seqlen"), mode), {}, ()
    x.requires_grad_(True)
    if case.op in POOL_MODES:
        name = {"mean": "masked_mean", "max": "masked_max", "mean_max": "masked_mean_max"}[case.op]
        return name, (x, mask), kwargs, (x,)
    if case.op == "probe_attention":
        probes = torch.empty(case.heads, hidden, dtype=dtype, requires_grad=True)
        return "probe_attention_pool", (x, probes, mask), kwargs, (x, probes)
    if case.op == "attention":
        shape = tokens if case.heads == 1 else (*tokens, case.heads)
        scores = torch.empty(shape, dtype=dtype, requires_grad=True)
        return "attention_pool", (x, scores, mask), kwargs, (x, scores)
    query_shape = (hidden,) if case.heads == 1 else (case.heads, case.size)
    query = torch.empty(query_shape, dtype=dtype, requires_grad=True)
    return "query_attention_pool", (x, query, mask), kwargs, (x, query)


def _span_inputs(case: Case, dtype: torch.dtype, hidden: int):
    """span_pool's call: split, 2 spans over SPLIT_LEN tokens (int64 spans); else MANY_SPANS spans of
    4 tokens over SHORT_LEN * 4 (int32 spans: the other pointer type)."""
    if case.layout == "one_token":
        tokens, spans = 1, torch.tensor([[0, 1]], dtype=torch.int64)
    elif case.split:
        tokens, spans = SPLIT_LEN, torch.tensor([[0, SPLIT_LEN], [10, SPLIT_LEN // 2]], dtype=torch.int64)
    else:
        tokens = SHORT_LEN * 4
        starts = torch.arange(MANY_SPANS, dtype=torch.int32) % (tokens - 4)
        spans = torch.stack([starts, starts + 4], 1)
    x = torch.empty(tokens, hidden, dtype=dtype, requires_grad=True)
    mask = _mask(case.mask, (tokens,), dtype)
    return "span_pool", (x, spans, mask), {"mode": case.op.removeprefix("span_")}, (x,)


# --- probe_attention_pool ------------------------------------------------------------------------


def _probe_cases() -> list[Case]:
    """Padded (masks none / bool) and varlen, split and not, fp32 / bf16, H x P."""
    cases = []
    for layout, mask, split, dtype, size, probes in itertools.product(
        ("padded", "varlen"), PROBE_MASKS, (True, False), DTYPES, PROBE_SIZES, PROBE_COUNTS
    ):
        if layout == "padded" or mask == "none":
            cases.append(Case("probe_attention", layout, mask, split, dtype, size, probes))
    return cases


# --- linear_pool -----------------------------------------------------------------------------------
# Op "linear_<mode>:<activation>:N=<features>", size = H. Every mode with SPLADE's projection
# (H = 768, N = 30522, log1p_relu) over the pool ops' layouts, masks, split / no split and dtypes;
# each other activation (an epilogue change) for max and sum in bf16; (H, N) = (1000, 250) (no
# 16-aligned sizes) without masks.
LINEAR_MODES = ("max", "sum", "mean")
LINEAR_ACTIVATIONS = ("none", "relu", "log1p_log1p_relu", "gelu", "tanh", "silu")  # besides log1p_relu
SPLADE = (768, 30522)


def _linear_cases() -> list[Case]:
    cases = []
    for mode, layout, mask, split, dtype in itertools.product(
        LINEAR_MODES, ("padded", "varlen"), MASKS, (True, False), DTYPES
    ):
        if layout == "varlen" and mask == "bool":
            continue  # varlen takes per-token weights only
        cases.append(
            Case(f"linear_{mode}:log1p_relu:N={SPLADE[1]}", layout, mask, split, dtype, SPLADE[0], 0)
        )
    for mode, activation in itertools.product(("max", "sum"), LINEAR_ACTIVATIONS):
        cases.append(
            Case(f"linear_{mode}:{activation}:N={SPLADE[1]}", "padded", "none", False, "bf16", 768, 0)
        )
    for mode, dtype in itertools.product(LINEAR_MODES, DTYPES):
        cases.append(Case(f"linear_{mode}:log1p_relu:N=250", "padded", "none", False, dtype, 1000, 0))
    return cases


def _linear_inputs(case: Case, dtype: torch.dtype):
    """linear_pool's call: x as the pool ops' (split: few long sequences), weight (N, H), bias (N,)."""
    op, activation, features = case.op.split(":")
    features = int(features.removeprefix("N="))
    kwargs = {"mode": op.removeprefix("linear_"), "activation": None if activation == "none" else activation}
    if case.layout == "padded":
        batch, length = (1, SPLIT_LEN) if case.split else (4, SHORT_LEN)
        x = torch.empty(batch, length, case.size, dtype=dtype, requires_grad=True)
        mask = _mask(case.mask, (batch, length), dtype)
    else:
        lengths = [SPLIT_LEN // 2] * 2 if case.split else [SHORT_LEN] * 4
        if not case.split:
            kwargs["max_seqlen"] = SHORT_LEN
        kwargs["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        x = torch.empty(sum(lengths), case.size, dtype=dtype, requires_grad=True)
        mask = _mask(case.mask, (sum(lengths),), dtype)
    weight = torch.empty(features, case.size, dtype=dtype, requires_grad=True)
    bias = torch.empty(features, dtype=dtype, requires_grad=True)
    return "linear_pool", (x, weight, bias, mask), kwargs, (x, weight, bias)
