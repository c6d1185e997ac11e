"""Argument checks: every bad input in DESIGN.md raises ValueError / TypeError naming the argument,
and every good one (a max_seqlen hint of any size) runs; the C++/CUDA extension's ops called
directly (torch.ops.fused_pool.ext_*), as the Python layer's checks do not guard them, raise instead
of reading out of bounds (device, dtype, shape, mode). The fused_pool.nn constructors' checks are in
test_nn.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens_of, make_generator, needs_cuda_extension, needs_extension

import fused_pool
from fused_pool import reference, validate_cu_seqlens
from fused_pool.contract import MEAN, MEAN_MAX

POOL_OPS = ["masked_mean", "masked_max", "masked_mean_max"]
BACKENDS = [None, "torch"] + [b for b in ("triton", "cpu") if b in fused_pool.available_backends()]

x3 = torch.randn(2, 5, 8)
x2 = torch.randn(7, 8)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)

BAD_POOL_CALLS = [
    # (args, kwargs, error, message fragment)
    ((x3.numpy(),), {}, TypeError, "x must be a torch.Tensor"),
    ((x3.long(),), {}, TypeError, "x must be float16, bfloat16, float32 or float64, got dtype torch.int64"),
    ((x2,), {}, ValueError, r"x must be \(B, L, H\) when cu_seqlens is None, got shape \(7, 8\)"),
    ((torch.randn(2, 5, 8, 1),), {}, ValueError, r"x must be \(B, L, H\)"),
    ((x3, torch.ones(2, 4)), {}, ValueError, r"mask must be \(B, L\) = \(2, 5\) .* got shape \(2, 4\)"),
    ((x3, torch.ones(5, 2)), {}, ValueError, r"mask must be \(B, L\)"),
    ((x3, torch.ones(2, 5, dtype=torch.complex64)), {}, TypeError, "mask must be bool, integer or floating"),
    ((x3, torch.ones(2, 5, device="meta")), {}, ValueError, "mask is on meta but x is on cpu"),
    ((x2, torch.ones(1, 7)), {"cu_seqlens": cu}, ValueError, "mask must be None when cu_seqlens is given"),
    (
        (x2,),
        {"cu_seqlens": cu.float()},
        TypeError,
        "cu_seqlens must be int32 or int64, got dtype torch.float32",
    ),
    (
        (x2,),
        {"cu_seqlens": cu[None]},
        ValueError,
        r"cu_seqlens must be 1-D of shape \(B \+ 1,\), got shape \(1, 3\)",
    ),
    ((x2,), {"cu_seqlens": cu[:0]}, ValueError, "cu_seqlens must be 1-D"),
    ((x2,), {"cu_seqlens": cu.to("meta")}, ValueError, "cu_seqlens is on meta but x is on cpu"),
    ((x2,), {"cu_seqlens": [0, 3, 7]}, TypeError, "cu_seqlens must be a torch.Tensor"),
    ((x3,), {"cu_seqlens": cu}, ValueError, r"x must be \(T, H\) or \(1, T, H\) when cu_seqlens is given"),
    ((x2[None, None],), {"cu_seqlens": cu}, ValueError, r"x must be \(T, H\)"),
    ((x2,), {"cu_seqlens": cu, "max_seqlen": 4.0}, TypeError, "max_seqlen must be a Python int"),
    ((x2,), {"cu_seqlens": cu, "max_seqlen": torch.tensor(4)}, TypeError, "max_seqlen must be a Python int"),
    ((x2,), {"cu_seqlens": cu, "max_seqlen": -1}, ValueError, "max_seqlen must be >= 0"),
    ((x2,), {"cu_seqlens": cu, "max_seqlen": -(2**70)}, ValueError, "max_seqlen must be >= 0"),
    (
        (x2,),
        {"cu_seqlens": cu, "max_seqlen": True},
        TypeError,
        "max_seqlen must be a Python int or None, got bool",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", POOL_OPS)
@pytest.mark.parametrize("args, kwargs, error, message", BAD_POOL_CALLS)
def test_bad_pool_input(op, backend, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        getattr(fused_pool, op)(*args, backend=backend, **kwargs)


def _hinted_call(op: str, varlen: bool, backend: str, seed: int):
    """(call(max_seqlen, *leaves), reference(*leaves), leaves) for one op on 3 sequences, one empty."""
    gen = make_generator(seed)
    x = torch.randn(9, 8, generator=gen) if varlen else torch.randn(3, 7, 8, generator=gen)
    leaves = [x]
    if op == "attention_pool":
        leaves.append(torch.randn(*x.shape[:-1], 2, generator=gen))
    if op == "query_attention_pool":
        leaves.append(torch.randn(2, 4, generator=gen))
    layout = dict(cu_seqlens=cu_seqlens_of([2, 0, 7])) if varlen else {}
    mask = None if varlen else torch.rand(3, 7, generator=gen) > 0.3
    fn, ref = getattr(fused_pool, op), getattr(reference, op)
    return (
        lambda max_seqlen, *t: fn(*t, mask, max_seqlen=max_seqlen, backend=backend, **layout),
        lambda *t: ref(*t, mask, **layout),
        leaves,
    )


CPU_BACKENDS = ["torch"] + [b for b in ("triton", "cpu") if b in fused_pool.available_backends()]
HINTED_OPS = [*POOL_OPS, "attention_pool", "query_attention_pool"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", HINTED_OPS)
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_max_seqlen_hint_of_any_size(op, varlen, backend):
    """max_seqlen is a host hint: any int >= 0, beyond int64 too, gives the same result (it was a
    dispatcher error on the cpu backend, whose ops take an int64)."""
    call, ref, leaves = _hinted_call(op, varlen, backend, seed=len(op) + varlen)
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    expected = ref(*ref_leaves)
    grad = torch.randn(expected.shape, generator=make_generator(1))
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad)
    for max_seqlen in (None, 0, 7, 2**31, 2**63 - 1, 2**63, 2**100):
        hinted = [t.clone().requires_grad_() for t in leaves]
        out = call(max_seqlen, *hinted)
        assert_close(out, expected)
        for got, want in zip(torch.autograd.grad(out, hinted, grad), expected_grads, strict=True):
            assert_close(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["masked_mean_max", "attention_pool", "query_attention_pool"])
def test_max_seqlen_beyond_int64_under_compile(op, backend):
    """Under torch.compile every backend's op is called through its int64 schema."""
    call, ref, leaves = _hinted_call(op, True, backend, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: call(2**63, *t), fullgraph=True)
    assert_close(compiled(*leaves), ref(*leaves))


sp = torch.tensor([[0, 3], [2, 7]])
BAD_SPAN_CALLS = [  # (args, kwargs, error, message fragment): span_pool(x, spans, mask, mode=...)
    ((x2.int(), sp), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
    ((x2[0], sp), {}, ValueError, r"x must be \(T, H\) or \(B, L, H\), got shape \(8\)"),
    ((x2, [[0, 3]]), {}, TypeError, "spans must be a torch.Tensor"),
    ((x2, sp.float()), {}, TypeError, "spans must be int32 or int64, got dtype torch.float32"),
    ((x2, sp.new_zeros(3, 3)), {}, ValueError, r"spans must be \(S, 2\) .* got shape \(3, 3\)"),
    ((x2, sp[:, :1]), {}, ValueError, r"spans must be \(S, 2\) \[start, end\) .* got shape \(2, 1\)"),
    ((x2, sp.to("meta")), {}, ValueError, "spans is on meta but x is on cpu"),
    ((x2, sp, torch.ones(6)), {}, ValueError, r"mask must be \(T,\) = \(7,\) to match x .* got shape \(6\)"),
    ((x3, sp, torch.ones(10)), {}, ValueError, r"mask must be \(B, L\) = \(2, 5\)"),
    ((x2, sp, torch.ones(7, dtype=torch.complex64)), {}, TypeError, "mask must be bool, integer or floating"),
    ((x2, sp, torch.ones(7, device="meta")), {}, ValueError, "mask is on meta but x is on cpu"),
    ((x2, sp, [1] * 7), {}, TypeError, "mask must be a torch.Tensor"),
    ((x2, sp), {"mode": "sum"}, ValueError, r"mode must be one of \('mean', 'max', 'mean_max'\), got 'sum'"),
    ((x2, sp), {"mode": 1}, TypeError, "mode must be a str"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, kwargs, error, message", BAD_SPAN_CALLS)
def test_bad_span_input(backend, args, kwargs, error, message):
    pytest.raises(error, fused_pool.span_pool, *args, backend=backend, **kwargs).match(message)


@pytest.mark.parametrize("op", POOL_OPS)
def test_bad_backend(op):
    fn = getattr(fused_pool, op)
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(x3, backend="tensorrt")
    with pytest.raises(TypeError, match="backend must be a str"):
        fn(x3, backend=1)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: .*"):
        fn(x3, backend="cuda")


def test_validate_cu_seqlens():
    validate_cu_seqlens(torch.tensor([0, 0, 3, 7]), 7)
    validate_cu_seqlens(torch.tensor([0], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="must start at 0, got cu_seqlens\\[0\\] = 2"):
        validate_cu_seqlens(torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="non-decreasing, got cu_seqlens\\[1\\] = 5 > cu_seqlens\\[2\\] = 3"):
        validate_cu_seqlens(torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="must end at T = 8, got cu_seqlens\\[-1\\] = 9"):
        validate_cu_seqlens(torch.tensor([0, 9]), 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        validate_cu_seqlens(torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="int32 or int64"):
        validate_cu_seqlens(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        validate_cu_seqlens(torch.zeros(2, 2, dtype=torch.int64))


scores3 = torch.randn(2, 5, 4)
BAD_ATTENTION_CALLS = [
    (
        (x3, torch.randn(2, 4)),
        {},
        ValueError,
        r"scores must be \(B, L\) or \(B, L, nh\) matching x \(2, 5, 8\), got shape \(2, 4\)",
    ),
    ((x3, torch.randn(2, 5, 3)), {}, ValueError, "scores has nh = 3 heads, which must divide H = 8"),
    ((x3, torch.randn(2, 5, 0)), {}, ValueError, "scores has nh = 0 heads"),
    ((x3, torch.randn(5, 2)), {}, ValueError, r"scores must be \(B, L\)"),
    ((x3, torch.randn(2, 5, 2, 1)), {}, ValueError, r"scores must be \(B, L\)"),
    (
        (x3, torch.ones(2, 5, dtype=torch.long)),
        {},
        TypeError,
        "scores must be a floating tensor, got dtype torch.int64",
    ),
    ((x3, scores3.to("meta")), {}, ValueError, "scores is on meta but x is on cpu"),
    ((x3, scores3, torch.ones(2, 4)), {}, ValueError, r"mask must be \(B, L\)"),
    (
        (x2, torch.randn(7, 3)),
        {"cu_seqlens": cu},
        ValueError,
        "scores has nh = 3 heads, which must divide H = 8",
    ),
    (
        (x2, torch.randn(6)),
        {"cu_seqlens": cu},
        ValueError,
        r"scores must be \(T,\) or \(T, nh\) matching x \(7, 8\)",
    ),
    ((x2, scores3), {"cu_seqlens": cu}, ValueError, r"scores must be \(T,\) or \(T, nh\)"),
    ((x3.int(), scores3), {}, TypeError, "x must be float16"),
]
BAD_QUERY_CALLS = [
    (
        (x3, torch.randn(7)),
        {},
        ValueError,
        r"query must be \(H,\) = \(8,\) or \(nh, H/nh\) with nh dividing H, got \(7\)",
    ),
    ((x3, torch.randn(3, 3)), {}, ValueError, r"query must be \(H,\) = \(8,\) or \(nh, H/nh\)"),
    ((x3, torch.randn(1, 2, 4)), {}, ValueError, r"query must be \(H,\)"),
    ((x3, torch.ones(8, dtype=torch.int32)), {}, TypeError, "query must be a floating tensor"),
    ((x3, torch.randn(8, device="meta")), {}, ValueError, "query is on meta but x is on cpu"),
    ((x3, torch.randn(8)), {"scale": "0.5"}, TypeError, "scale must be a Python float or None, got str"),
    ((x3, torch.randn(8)), {"scale": torch.tensor(0.5)}, TypeError, "scale must be a Python float"),
    (
        (x3, torch.randn(8), torch.ones(2, 5)),
        {"cu_seqlens": cu},
        ValueError,
        "mask must be None when cu_seqlens",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, kwargs, error, message", BAD_ATTENTION_CALLS)
def test_bad_attention_input(backend, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_pool.attention_pool(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, kwargs, error, message", BAD_QUERY_CALLS)
def test_bad_query_attention_input(backend, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_pool.query_attention_pool(*args, backend=backend, **kwargs)


def test_mask_with_varlen_is_rejected():
    with pytest.raises(ValueError, match="mask must be None"):
        fused_pool.first_token(torch.randn(4, 3), torch.ones(4), cu_seqlens=cu_seqlens_of([4]))


# --- the extension's ops called directly: CPU kernels always, the CUDA kernels where a GPU is present

ops = torch.ops.fused_pool
B, L, H, T, NH = 2, 5, 8, 7, 2


def _valid_inputs(device="cpu"):
    """Valid arguments of every ext op, padded and varlen (forward outputs feed the backwards)."""
    gen = torch.Generator().manual_seed(0)
    x3 = torch.randn(B, L, H, generator=gen).to(device)
    x2 = torch.randn(T, H, generator=gen).to(device)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    scores3 = torch.randn(B, L, NH, generator=gen).to(device)
    scores2 = torch.randn(T, NH, generator=gen).to(device)
    query = torch.randn(NH, H // NH, generator=gen).to(device)
    calls = {}
    for layout, x, m, c, scores in (("padded", x3, mask, None, scores3), ("varlen", x2, None, cu, scores2)):
        out, den, argmax = ops.ext_pool_fwd(x, m, c, None, MEAN_MAX)
        calls["ext_pool_fwd", layout] = [x, m, c, None, MEAN_MAX]
        grad = torch.ones_like(out)
        calls["ext_pool_bwd", layout] = [grad, m, c, den, argmax, list(x.shape), x.dtype, MEAN_MAX]
        a_out, a_stats = ops.ext_attention_fwd(x, scores, m, c, None)
        calls["ext_attention_fwd", layout] = [x, scores, m, c, None]
        calls["ext_attention_bwd", layout] = [torch.ones_like(a_out), x, scores, m, c, a_out, a_stats]
        q_out, q_stats = ops.ext_query_attention_fwd(x, query, m, c, None, 0.5)
        calls["ext_query_attention_fwd", layout] = [x, query, m, c, None, 0.5]
        calls["ext_query_attention_bwd", layout] = [
            torch.ones_like(q_out),
            x,
            query,
            m,
            c,
            q_out,
            q_stats,
            0.5,
        ]
    return calls


ARGS = {  # positions of the named arguments
    "ext_pool_fwd": ["x", "mask", "cu_seqlens", "max_seqlen", "mode"],
    "ext_pool_bwd": ["grad_out", "mask", "cu_seqlens", "den", "argmax", "x_shape", "x_dtype", "mode"],
    "ext_attention_fwd": ["x", "scores", "mask", "cu_seqlens", "max_seqlen"],
    "ext_attention_bwd": ["grad_out", "x", "scores", "mask", "cu_seqlens", "out", "stats"],
    "ext_query_attention_fwd": ["x", "query", "mask", "cu_seqlens", "max_seqlen", "scale"],
    "ext_query_attention_bwd": ["grad_out", "x", "query", "mask", "cu_seqlens", "out", "stats", "scale"],
}


FORWARD_OPS = ["ext_pool_fwd", "ext_attention_fwd", "ext_query_attention_fwd"]


BACKWARD_OPS = ["ext_pool_bwd", "ext_attention_bwd", "ext_query_attention_bwd"]


ATTENTION_OPS = [
    "ext_attention_fwd",
    "ext_attention_bwd",
    "ext_query_attention_fwd",
    "ext_query_attention_bwd",
]


ALL_OPS = list(ARGS)


X_OPS = [op for op in ALL_OPS if "x" in ARGS[op]]


def _cases():
    """(ops, layout, argument, bad value from the valid one, message regex)."""
    meta = lambda v: v.to("meta")  # noqa: E731
    cases = [
        # mode
        (
            ["ext_pool_fwd", "ext_pool_bwd"],
            "padded",
            "mode",
            lambda v: 0,
            r"mode must be 1 \(mean\), 2 \(max\)",
        ),
        (["ext_pool_fwd", "ext_pool_bwd"], "varlen", "mode", lambda v: 4, r"mode must be .* got 4"),
        (["ext_pool_fwd", "ext_pool_bwd"], "padded", "mode", lambda v: -1, r"mode must be"),
        (["ext_pool_fwd"], "padded", "mode", lambda v: 8 | MEAN, r"mode must be .* plus 4 \(states\), got 9"),
        (["ext_pool_bwd"], "padded", "mode", lambda v: 4 | MEAN, r"mode must be .* got 5"),
        # cu_seqlens: dtype, rank, device
        (
            ALL_OPS,
            "varlen",
            "cu_seqlens",
            lambda v: v.short(),
            r"cu_seqlens must be int32 or int64, got Short",
        ),
        (ALL_OPS, "varlen", "cu_seqlens", lambda v: v.float(), r"cu_seqlens must be int32 or int64"),
        (ALL_OPS, "varlen", "cu_seqlens", lambda v: v[None], r"cu_seqlens must be 1-D of shape \(B \+ 1,\)"),
        (ALL_OPS, "varlen", "cu_seqlens", lambda v: v[:0], r"cu_seqlens must be 1-D of shape \(B \+ 1,\)"),
        (ALL_OPS, "varlen", "cu_seqlens", meta, r"cu_seqlens is on meta but must be on cpu"),
        # the number of sequences must match the (B, ...) tensors of the backward
        (
            BACKWARD_OPS,
            "varlen",
            "cu_seqlens",
            lambda v: torch.tensor([0, 2, 5, 7], dtype=v.dtype),
            r"must be",
        ),
        # x: dtype, rank, device
        (
            X_OPS,
            "padded",
            "x",
            lambda v: v.long(),
            r"x must be float16, bfloat16, float32 or float64, got Long",
        ),
        (X_OPS, "padded", "x", lambda v: v[0], r"x must be \(B, L, H\) when cu_seqlens is None"),
        (X_OPS, "varlen", "x", lambda v: v[None], r"x must be \(T, H\) when cu_seqlens is given"),
        (X_OPS, "padded", "x", meta, r"x must be a CPU tensor, got one on meta"),
        (["ext_pool_bwd"], "padded", "x_dtype", lambda v: torch.int64, r"x_shape / x_dtype must be float16"),
        (["ext_pool_bwd"], "padded", "x_shape", lambda v: v[1:], r"x_shape / x_dtype must be \(B, L, H\)"),
        (["ext_pool_bwd"], "varlen", "x_shape", lambda v: [v[0], v[1], 1], r"must be \(T, H\)"),
        (["ext_pool_bwd"], "padded", "grad_out", meta, r"grad_out must be a CPU tensor, got one on meta"),
        # mask: shape, dtype, device; varlen per-token weights only for the pool ops
        (
            ALL_OPS,
            "padded",
            "mask",
            lambda v: v[:, :4],
            r"mask must be \(B, L\) = \[2, 5\], got shape \[2, 4\]",
        ),
        (ALL_OPS, "padded", "mask", lambda v: v.t(), r"mask must be \(B, L\)"),
        (
            ALL_OPS,
            "padded",
            "mask",
            lambda v: v.to(torch.complex64),
            r"mask must be bool, integer or floating",
        ),
        (ALL_OPS, "padded", "mask", meta, r"mask is on meta but must be on cpu"),
        (
            ["ext_pool_fwd", "ext_pool_bwd"],
            "varlen",
            "mask",
            lambda v: torch.ones(T - 1),
            r"mask must be \(T,\)",
        ),
        (
            ["ext_pool_fwd", "ext_pool_bwd"],
            "varlen",
            "mask",
            lambda v: torch.ones(1, T),
            r"mask must be \(T,\)",
        ),
        (
            ATTENTION_OPS,
            "varlen",
            "mask",
            lambda v: torch.ones(1, T),
            r"mask must be \(T,\)",
        ),
        # max_seqlen
        (FORWARD_OPS, "varlen", "max_seqlen", lambda v: -1, r"max_seqlen must be >= 0, got -1"),
        # pool backward state
        (
            ["ext_pool_bwd"],
            "padded",
            "grad_out",
            lambda v: v[:, :H],
            r"grad_out must be \(B, 2H\) = \[2, 16\]",
        ),
        (["ext_pool_bwd"], "padded", "grad_out", lambda v: v.long(), r"grad_out must be float16"),
        (["ext_pool_bwd"], "padded", "den", lambda v: v.double(), r"den must be Float, got Double"),
        (["ext_pool_bwd"], "varlen", "den", lambda v: v[:1], r"den must be \(B,\) = \[2\]"),
        (["ext_pool_bwd"], "padded", "den", meta, r"den is on meta but must be on cpu \(grad_out's device\)"),
        (["ext_pool_bwd"], "padded", "argmax", lambda v: v.long(), r"argmax must be Int, got Long"),
        (["ext_pool_bwd"], "varlen", "argmax", lambda v: v[:, :4], r"argmax must be \(B, H\) = \[2, 8\]"),
        (["ext_pool_bwd"], "padded", "argmax", lambda v: v[:1], r"argmax must be \(B, H\)"),
        (["ext_pool_bwd"], "padded", "argmax", meta, r"argmax is on meta but must be on cpu"),
        # scores
        (
            ["ext_attention_fwd", "ext_attention_bwd"],
            "padded",
            "scores",
            lambda v: v[..., 0],
            r"scores must be \(B, L, nh\) with \(B, L\) = \[2, 5\], got shape \[2, 5\]",
        ),
        (["ext_attention_fwd", "ext_attention_bwd"], "padded", "scores", lambda v: v[:, :4], r"\(B, L, nh\)"),
        (["ext_attention_fwd", "ext_attention_bwd"], "varlen", "scores", lambda v: v[:6], r"\(T, nh\)"),
        (
            ["ext_attention_fwd"],
            "padded",
            "scores",
            lambda v: torch.ones(B, L, 3),
            r"nh = 3 heads.*divide H = 8",
        ),
        (
            ["ext_attention_fwd"],
            "varlen",
            "scores",
            lambda v: torch.ones(T, 0),
            r"nh = 0 heads, which must be >= 1",
        ),
        (
            ["ext_attention_fwd", "ext_attention_bwd"],
            "padded",
            "scores",
            lambda v: v.long(),
            r"scores must be float",
        ),
        (["ext_attention_fwd", "ext_attention_bwd"], "varlen", "scores", meta, r"scores is on meta"),
        # query
        (
            ["ext_query_attention_fwd", "ext_query_attention_bwd"],
            "padded",
            "query",
            lambda v: v.flatten(),
            r"query",
        ),
        (
            ["ext_query_attention_fwd"],
            "padded",
            "query",
            lambda v: torch.ones(3, 4),
            r"nh = 3 heads.*divide H = 8",
        ),
        (
            ["ext_query_attention_fwd"],
            "varlen",
            "query",
            lambda v: torch.ones(2, 3),
            r"query must be \(nh, H / nh\)",
        ),
        (["ext_query_attention_fwd"], "padded", "query", lambda v: torch.ones(0, 4), r"nh = 0 heads"),
        (
            ["ext_query_attention_fwd", "ext_query_attention_bwd"],
            "padded",
            "query",
            lambda v: v.int(),
            r"query must",
        ),
        (
            ["ext_query_attention_fwd", "ext_query_attention_bwd"],
            "varlen",
            "query",
            meta,
            r"query is on meta",
        ),
        # attention backward state
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "padded",
            "grad_out",
            lambda v: v[:, :4],
            r"grad_out must",
        ),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "varlen",
            "grad_out",
            lambda v: v.int(),
            r"grad_out must",
        ),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "padded",
            "out",
            lambda v: v.double(),
            r"out must be Float",
        ),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "varlen",
            "out",
            lambda v: v[:1],
            r"out must be \(B, H\)",
        ),
        (["ext_attention_bwd", "ext_query_attention_bwd"], "padded", "out", meta, r"out is on meta"),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "padded",
            "stats",
            lambda v: v[:, :1],
            r"\(B, nh, 2\)",
        ),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "varlen",
            "stats",
            lambda v: v[..., :1],
            r"stats must",
        ),
        (
            ["ext_attention_bwd", "ext_query_attention_bwd"],
            "padded",
            "stats",
            lambda v: v.double(),
            r"stats must",
        ),
    ]
    for names, layout, arg, bad, message in cases:
        for name in names:
            if arg in ARGS[name]:
                yield pytest.param(
                    name, layout, arg, bad, message, id=f"{name}-{layout}-{arg}-{message[:24]}"
                )


_CPU_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@needs_extension
@pytest.mark.parametrize("name, layout, arg, bad, message", list(_cases()))
def test_ext_op_rejects_bad_argument_cpu(name, layout, arg, bad, message):
    args = _valid_inputs()[name, layout]
    index = ARGS[name].index(arg)
    args[index] = bad(args[index])
    op = getattr(ops, name).default
    with pytest.raises(RuntimeError, match=message):
        # The CPU kernel itself (the dispatcher would send a call with a meta tensor to the fake kernel).
        op.redispatch(_CPU_ONLY, *args)


@needs_extension
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_ext_op_valid_call_still_works_cpu(name, layout):
    args = _valid_inputs()[name, layout]
    outputs = getattr(ops, name)(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert torch.isfinite(outputs[0]).all()  # (attention stats hold m = -inf for the empty sequence)


@needs_cuda_extension
@pytest.mark.parametrize("name", ALL_OPS)
def test_ext_op_rejects_cpu_cu_seqlens_for_cuda_x(name):
    args = _valid_inputs("cuda")[name, "varlen"]
    args[ARGS[name].index("cu_seqlens")] = args[ARGS[name].index("cu_seqlens")].cpu()
    with pytest.raises(RuntimeError, match=r"cu_seqlens is on cpu but must be on cuda"):
        getattr(ops, name)(*args)
    torch.cuda.synchronize()


@needs_cuda_extension
def test_ext_op_rejects_cuda_tensor_for_cpu_x():
    args = _valid_inputs("cpu")["ext_pool_fwd", "varlen"]
    args[2] = args[2].cuda()  # the dispatcher picks the CUDA kernel, which must refuse CPU x
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor, got one on cpu"):
        ops.ext_pool_fwd(*args)
