"""Every bad input in DESIGN.md raises ValueError / TypeError naming the argument, and every good
one (a max_seqlen hint of any size) runs."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens_of, make_generator

import fused_pool
from fused_pool import reference, validate_cu_seqlens

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
