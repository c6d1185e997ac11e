"""Property-based differential test: random cases of every op on every CPU-runnable backend
against `fused_pool.reference` run in float64, outputs and gradients.

Hypothesis draws a `Case` (op, backend, dtypes, shapes incl. 0 and 1, strides, mask, cu_seqlens,
heads, a value seed); `check_case` builds its tensors and compares. Each category of input (padded,
strided, expanded, varlen, strided cu_seqlens, ...) is its own test item, so a known defect is
excluded by one line in KNOWN_DEFECTS. Budgets are fixed and derandomized: the file costs the same
on every run (about 70 s of CPU time, the Triton interpreter included). A failure prints the
shrunk case, its tensors' shapes / strides / dtypes, and a one-line reproduction.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from helpers import ERROR_FLOOR, assert_close, cpu_kernel_backends, outputs_and_grads
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import fused_pool
from fused_pool import reference
from fused_pool.backends import unavailable_reason

POOL_OPS = ("masked_mean", "masked_max", "masked_mean_max")
ATTENTION_OPS = ("attention_pool", "query_attention_pool")
TOKEN_OPS = ("first_token", "last_token")  # one gather on every backend: no backend argument
PROBE_OPS = ("probe_attention_pool",)  # on the backends that have its kernels (kernel_backends)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64)

CATEGORIES = (
    "padded",  # contiguous x, masks of every kind (holes, empty rows, float weights)
    "padded_strided",  # transposed / sliced x, mask, scores, query
    "padded_expanded",  # x, mask, scores with stride-0 dimensions
    "padded_nan_padding",  # NaN in x and scores where the mask drops the token: never read
    "varlen",  # contiguous (T, H) / (1, T, H), int32 / int64 cu_seqlens, zero-length segments
    "varlen_strided_x",  # strided / expanded x, scores, per-token weights
    "varlen_strided_cu_seqlens",  # cu_seqlens a strided view over garbage
)

# Examples per test item. The Triton interpreter costs ~0.1 s a call: its cases are small and few.
EXAMPLES = {"cpu": 20, "torch": 20, "triton": 10, None: 15}
# probe_attention_pool's items take half as many (test_probe_attention.py covers its paths): the
# file's budget grows by a tenth, not a fifth.
EXAMPLES_SHARE = {"probe_attention_pool": 0.5}
# Triton's interpreter is slow: keep its shapes small.
MAX_LENGTH = {"triton": 9}
MAX_HIDDEN = {"triton": 16}

# (category, backend) or (category, backend, op) -> reason, for defects that another change is
# fixing. Those items are strict xfails: when the fix lands they XPASS and fail, and the line goes.
KNOWN_DEFECTS: dict[tuple, str] = {}


def known_defect(category: str, backend: str | None, op: str) -> str | None:
    return KNOWN_DEFECTS.get((category, backend, op)) or KNOWN_DEFECTS.get((category, backend))


def cpu_backends() -> list[str]:
    return [b for b in ("cpu", "torch", "triton") if unavailable_reason(b, torch.device("cpu")) is None]


# --- Cases -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class View:
    """A strided view of a fresh storage: dims stored in `perm` order (outermost first), every
    `steps[d]`-th element taken along dim d, `expanded` dims broadcast from size 1 (stride 0), the
    first `offset` storage elements skipped."""

    perm: tuple[int, ...]
    steps: tuple[int, ...]
    expanded: tuple[bool, ...]
    offset: int = 0


def contiguous(ndim: int) -> View:
    return View(tuple(range(ndim)), (1,) * ndim, (False,) * ndim)


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything that defines one example; `repr` is the Python that rebuilds it."""

    op: str
    backend: str | None
    dtype: torch.dtype
    seed: int
    hidden: int
    batch: int = 0  # padded: (B, L, H)
    length: int = 0
    lengths: tuple[int, ...] | None = None  # varlen: one length per sequence, T = sum
    x_view: View = contiguous(3)
    batch_dim: bool = False  # varlen x as (1, T, H)
    ties: bool = False  # values drawn from {-2, ..., 2}: many equal maxima
    mask_dtype: torch.dtype | None = None  # None: no mask; varlen masked_mean: weights (T,)
    keep_prob: float = 1.0
    empty_rows: tuple[int, ...] = ()
    mask_view: View | None = None
    heads: int = 1
    heads_dim: bool = False  # one head given as (B, L, 1) / (T, 1) scores or a (1, H) query
    other_dtype: torch.dtype | None = None  # scores / query
    other_view: View | None = None
    score_scale: float = 1.0
    scale: float | None = None  # query_attention_pool's / probe_attention_pool's scale
    probes: int = 0  # probe_attention_pool's P
    nan_padding: bool = False
    cu_dtype: torch.dtype = torch.int32
    cu_step: int = 1  # cu_seqlens is every cu_step-th element of a storage filled with garbage
    max_seqlen: int | None = None

    def __repr__(self) -> str:  # the fields that differ from the defaults
        fields = dataclasses.fields(self)
        given = [f for f in fields if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default]
        return "Case(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in given) + ")"

    @property
    def varlen(self) -> bool:
        return self.lengths is not None


def _fill(gen: torch.Generator, numel: int, dtype: torch.dtype, ties: bool, scale: float = 1.0):
    if ties:
        values = torch.randint(-2, 3, (numel,), generator=gen).float()
    else:
        values = torch.randn(numel, generator=gen) * scale
    return values.to(dtype)


def materialize(shape: tuple[int, ...], view: View, storage_of) -> torch.Tensor:
    """A tensor of `shape` laid out as `view` says over storage_of(numel) (a flat tensor)."""
    base = [1 if e else n * s for n, s, e in zip(shape, view.steps, view.expanded, strict=True)]
    stored = [base[d] for d in view.perm]
    storage = storage_of(view.offset + math.prod(stored))
    inverse = sorted(range(len(shape)), key=lambda d: view.perm[d])
    t = storage[view.offset :].view(stored).permute(inverse)
    t = t[tuple(slice(None, None, s) for s in view.steps)]
    return t.expand(shape)


def _mask_values(case: Case, gen: torch.Generator, numel: int) -> torch.Tensor:
    """Keep with probability keep_prob; floating masks are weights in (0.25, 2], integer masks
    any nonzero value."""
    keep = torch.rand(numel, generator=gen) < case.keep_prob
    if case.mask_dtype.is_floating_point:
        weights = torch.rand(numel, generator=gen) * 1.75 + 0.25
        return torch.where(keep, weights, 0).to(case.mask_dtype)
    if case.mask_dtype == torch.bool:
        return keep
    values = torch.tensor([1, 2, 3, 1] if case.mask_dtype == torch.uint8 else [1, -1, 2, 7])
    return torch.where(keep, values[torch.randint(0, 4, (numel,), generator=gen)], 0).to(case.mask_dtype)


def build(case: Case) -> dict:
    """The case's tensors: x, other (scores / query or None), mask, cu_seqlens, grad."""
    gen = torch.Generator().manual_seed(case.seed)
    hidden = case.hidden
    tokens = (sum(case.lengths),) if case.varlen else (case.batch, case.length)
    x_shape = (*tokens, hidden)
    if case.varlen and case.batch_dim:
        x_shape = (1, *x_shape)
    x = materialize(x_shape, case.x_view, lambda n: _fill(gen, n, case.dtype, case.ties))

    mask = None
    if case.mask_dtype is not None:
        mask = materialize(tokens, case.mask_view, lambda n: _mask_values(case, gen, n))
        if case.empty_rows:
            mask[list(case.empty_rows)] = 0  # in place: keeps the mask's strides

    other = None
    if case.op == "attention_pool":
        shape = (*tokens, case.heads) if case.heads > 1 or case.heads_dim else tokens
        fill = lambda n: _fill(gen, n, case.other_dtype, case.ties, case.score_scale)
        other = materialize(shape, case.other_view, fill)
    elif case.op == "query_attention_pool":
        shape = (case.heads, hidden // case.heads) if case.heads > 1 or case.heads_dim else (hidden,)
        other = materialize(shape, case.other_view, lambda n: _fill(gen, n, case.other_dtype, case.ties))
    elif case.op == "probe_attention_pool":
        fill = lambda n: _fill(gen, n, case.other_dtype, case.ties)
        other = materialize((case.probes, hidden), case.other_view, fill)

    if case.nan_padding and mask is not None:
        dropped = mask == 0
        x.masked_fill_(dropped[..., None], math.nan)  # in place: keeps the strides
        if case.op == "attention_pool":
            other.masked_fill_(dropped if other.dim() == 2 else dropped[..., None], math.nan)

    cu_seqlens = None
    if case.varlen:
        bounds = torch.tensor([0, *itertools.accumulate(case.lengths)], dtype=case.cu_dtype)
        cu_seqlens = bounds
        if case.cu_step > 1:  # garbage between the values: a kernel that ignores the stride reads it
            storage = torch.full((len(bounds) * case.cu_step + 1,), 2**30 - 1, dtype=case.cu_dtype)
            storage[1::2] = -3
            cu_seqlens = storage[1 :: case.cu_step][: len(bounds)]
            cu_seqlens.copy_(bounds)

    out_hidden = 2 * hidden if case.op == "masked_mean_max" else hidden
    num_seqs = len(case.lengths) if case.varlen else case.batch
    out_shape = (num_seqs, case.probes, hidden) if case.op in PROBE_OPS else (num_seqs, out_hidden)
    grad = torch.randn(out_shape, generator=gen).to(case.dtype)
    return dict(x=x, other=other, mask=mask, cu_seqlens=cu_seqlens, grad=grad)


def report(text: str) -> None:
    """Printed with a failing example's shrunk case (or at once outside Hypothesis)."""
    try:
        note(text)
    except InvalidArgument:
        print(text)


def describe(name: str, t: torch.Tensor | None) -> str:
    if t is None:
        return f"{name}: None"
    text = f"{name}: {tuple(t.shape)} {t.dtype} strides {t.stride()} offset {t.storage_offset()}"
    return text + (f" values {t.tolist()}" if t.dim() == 1 and t.numel() <= 12 else "")


# --- The comparison ----------------------------------------------------------------------------


def call(module, case: Case, x, other, mask, cu_seqlens):
    fn = getattr(module, case.op)
    kwargs = dict(cu_seqlens=cu_seqlens)
    if case.op not in TOKEN_OPS:
        kwargs["max_seqlen"] = case.max_seqlen
        if module is fused_pool:
            kwargs["backend"] = case.backend
    if case.op in ("query_attention_pool", *PROBE_OPS):
        kwargs["scale"] = case.scale
    args = (x, mask) if other is None else (x, other, mask)
    return fn(*args, **kwargs)


def reference_outputs_and_grads(fn, inputs, grad):
    """outputs_and_grads for the reference, whose result need not depend on every input: scores
    when L = 0, anything when T = 0 (the reference's zeros are then constants). Their gradient is
    zeros."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if not out.requires_grad:
        return out, [torch.zeros_like(t) for t in leaves]
    return out, torch.autograd.grad(out, leaves, grad, allow_unused=True, materialize_grads=True)


def check_case(case: Case) -> None:
    """Fused op against the float64 reference: outputs, dx and dscores / dquery. Max and token
    outputs (and their dx) are exact; means use the per-dtype tolerances; attention gradients
    (dot products) are held to twice the reference's own error at the inputs' precision."""
    t = build(case)
    x, other, mask, cu_seqlens, grad = t["x"], t["other"], t["mask"], t["cu_seqlens"], t["grad"]
    for name in ("x", "other", "mask", "cu_seqlens"):
        report(describe(name, t[name]))
    command = f"import conftest; from test_differential import *; check_case({case!r})"
    report(f'reproduce: cd tests && PYTHONPATH=.. python -c "{command}"')
    inputs = [x] if other is None else [x, other]

    def run(module, *leaves):
        return call(module, case, leaves[0], leaves[1] if len(leaves) > 1 else None, mask, cu_seqlens)

    out, grads = outputs_and_grads(lambda *a: run(fused_pool, *a), inputs, grad, poisoned=True)
    exact_out, exact_grads = reference_outputs_and_grads(
        lambda *a: run(reference, *a), [i.double() for i in inputs], grad.double()
    )
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == exact_out.shape, (
        out.dtype,
        out.stride(),
        out.shape,
    )
    for actual, source in zip(grads, inputs, strict=True):
        assert actual.shape == source.shape and actual.dtype == source.dtype, (actual.shape, actual.dtype)

    expected = exact_out.to(case.dtype)
    hidden = case.hidden
    if case.op in ("masked_max", *TOKEN_OPS):
        assert_close(out, expected, exact=True)
        assert_close(grads[0], exact_grads[0].to(case.dtype), exact=True)
        return
    if case.op == "masked_mean_max":
        assert_close(out[:, :hidden], expected[:, :hidden], msg=lambda m: f"mean half: {m}")
        assert_close(out[:, hidden:], expected[:, hidden:], exact=True, msg=lambda m: f"max half: {m}")
    else:
        assert_close(out, expected, msg=lambda m: f"output: {m}")
    if case.op in POOL_OPS:
        assert_close(grads[0], exact_grads[0].to(case.dtype), msg=lambda m: f"dx: {m}")
        return
    _, low_grads = reference_outputs_and_grads(lambda *a: run(reference, *a), inputs, grad)
    # dquery / dprobes sum over every token, in another order than the reference: their floor grows
    # as sqrt(T).
    num_tokens = x.shape[:-1].numel()
    terms = (1, num_tokens if case.op in ("query_attention_pool", *PROBE_OPS) else 1)
    for name, actual, low, exact, source, n in zip(
        ("dx", "dother"), grads, low_grads, exact_grads, inputs, terms, strict=False
    ):
        dtype = max(x.dtype, source.dtype, key=lambda d: torch.finfo(d).eps)
        assert_within_reference_error(actual, low, exact, dtype, name, n)


def assert_within_reference_error(actual, low, exact, dtype, name, terms=1):
    """helpers.assert_within_reference_error (flash-attention's rule: at most twice the error of
    the reference run at the inputs' precision, plus a floor relative to the largest exact value),
    with the floor times sqrt(terms) for a sum of `terms` float32 products."""
    exact = exact.double()
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan), f"{name}: NaN in different places"
    if not actual.numel():
        return
    error = (actual.double() - exact).abs().masked_fill(nan, 0).max().item()
    allowed = (low.double() - exact).abs().masked_fill(nan, 0).max().item()
    floor = ERROR_FLOOR[dtype] * max(1.0, exact.masked_fill(nan, 0).abs().max().item()) * terms**0.5
    assert error <= 2 * allowed + floor, (
        f"{name}: error {error:.3g} > 2 x reference error {allowed:.3g} + {floor:.3g}"
    )


# --- Strategies --------------------------------------------------------------------------------


@st.composite
def views(draw, ndim: int, strided: bool, expand: bool) -> View:
    view = contiguous(ndim)
    if strided:
        view = View(
            perm=tuple(draw(st.permutations(range(ndim)))),
            steps=tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(ndim)),
            expanded=view.expanded,
            offset=draw(st.integers(0, 2)),
        )
    if expand:
        view = dataclasses.replace(view, expanded=tuple(draw(st.booleans()) for _ in range(ndim)))
    return view


def sizes(limit: int | None, small: int, large: list[int], rare_zero: bool = True):
    """Sizes up to `small` (or `limit`), now and then a large one. With `rare_zero`, 0 comes up
    about as often as any other size (one in small + 1) and shrinking goes to 1: three dims that
    are 0 at Hypothesis's usual rate would leave half the cases empty."""
    upto = small if limit is None else limit
    if rare_zero:
        small_sizes = st.integers(1, upto + 1).map(lambda n: n % (upto + 1))
    else:
        small_sizes = st.integers(0, upto)
    return small_sizes if limit is not None else st.one_of(small_sizes, small_sizes, st.sampled_from(large))


@st.composite
def cases(draw, category: str, backend: str | None, op: str) -> Case:
    varlen = category.startswith("varlen")
    strided = category in ("padded_strided", "varlen_strided_x")
    expand = category in ("padded_expanded", "varlen_strided_x")
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    hidden = draw(sizes(MAX_HIDDEN.get(backend), 9, [16, 17, 40, 64]))
    max_length = MAX_LENGTH.get(backend)
    case = Case(op=op, backend=backend, dtype=dtype, seed=draw(st.integers(0, 2**16)), hidden=hidden)
    changes: dict = dict(ties=draw(st.booleans()))

    if varlen:
        length = sizes(max_length, 6, [33, 130], rare_zero=False)  # zero-length segments: often
        lengths = tuple(draw(st.lists(length, max_size=5)))
        changes.update(lengths=lengths, batch_dim=draw(st.booleans()))
        changes["x_view"] = draw(views(3 if changes["batch_dim"] else 2, strided, expand))
        changes["cu_dtype"] = draw(st.sampled_from([torch.int32, torch.int64]))
        if category == "varlen_strided_cu_seqlens":
            changes["cu_step"] = draw(st.sampled_from([2, 3]))
        longest = max(lengths, default=0)
        changes["max_seqlen"] = draw(st.sampled_from([None, longest, longest + 5]))
        token_dims = 1
    else:
        batch = draw(sizes(4, 4, []))
        length = draw(sizes(max_length, 9, [33, 130]))
        changes.update(batch=batch, length=length, x_view=draw(views(3, strided, expand)))
        token_dims = 2

    # Masks: any kind padded; varlen masked_mean alone takes floating per-token weights (T,).
    if varlen:
        mask_dtypes = [None, *FLOAT_DTYPES] if op == "masked_mean" else [None]
    else:
        mask_dtypes = [None, *INT_MASK_DTYPES, *FLOAT_DTYPES]
    if category == "padded_nan_padding":
        mask_dtypes = [torch.bool, torch.int64, torch.float32]
        changes["nan_padding"] = True
    mask_dtype = draw(st.sampled_from(mask_dtypes))
    if mask_dtype is not None:
        rows = changes.get("batch", 0)
        changes.update(
            mask_dtype=mask_dtype,
            keep_prob=draw(st.sampled_from([1.0, 0.7, 0.3, 0.0])),
            mask_view=draw(views(token_dims, strided, expand)),
        )
        if rows and not any(changes["mask_view"].expanded):  # rows of an expanded mask are one
            changes["empty_rows"] = tuple(sorted(draw(st.sets(st.integers(0, rows - 1)))))

    if op in ATTENTION_OPS:
        divisors = [d for d in range(1, max(hidden, 3) + 1) if hidden % d == 0]
        heads = draw(st.sampled_from(divisors))
        changes.update(heads=heads, heads_dim=heads == 1 and draw(st.booleans()))
        other_dtypes = [dtype, *FLOAT_DTYPES]
        changes["other_dtype"] = draw(st.sampled_from(other_dtypes))
        several = heads > 1 or changes["heads_dim"]
        if op == "attention_pool":
            ndim = token_dims + several
            changes["other_view"] = draw(views(ndim, strided, expand))
            changes["score_scale"] = draw(st.sampled_from([1.0, 0.0, 5.0, 1000.0]))
        else:
            changes["other_view"] = draw(views(1 + several, strided, False))
            changes["scale"] = draw(st.sampled_from([None, 0.5, 0.0, -2.0]))
    elif op in PROBE_OPS:
        changes.update(
            probes=draw(st.sampled_from([1, 2, 3, 7, 16])),
            other_dtype=draw(st.sampled_from([dtype, *FLOAT_DTYPES])),
            other_view=draw(views(2, strided, expand)),
            scale=draw(st.sampled_from([None, 0.5, 0.0, -2.0])),
        )
    return dataclasses.replace(case, **changes)


# --- The tests ---------------------------------------------------------------------------------


PROBE_BACKENDS = cpu_kernel_backends("probe_attention")


def items():
    for category in CATEGORIES:
        for backend in cpu_backends():
            for op in (*POOL_OPS, *ATTENTION_OPS):
                yield category, backend, op
            if backend in PROBE_BACKENDS:
                yield from ((category, backend, op) for op in PROBE_OPS)
        for op in TOKEN_OPS:
            yield category, None, op


def params():
    for category, backend, op in items():
        marks = []
        reason = known_defect(category, backend, op)
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        yield pytest.param(category, backend, op, marks=marks, id=f"{category}-{backend or 'any'}-{op}")


@pytest.mark.parametrize("category, backend, op", list(params()))
def test_matches_reference(category, backend, op):
    known = known_defect(category, backend, op) is not None
    # A known defect fails every run: skip shrinking it (the first failing case is reported).
    phases = (Phase.explicit, Phase.generate) if known else tuple(Phase)

    @settings(
        max_examples=max(1, int(EXAMPLES[backend] * EXAMPLES_SHARE.get(op, 1.0))),
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(category, backend, op))
    def differential(case):
        check_case(case)

    differential()
