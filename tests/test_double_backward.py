"""Second derivatives: fused_pool's gradients come from backward kernels, so differentiating them
again raises a clear error on every backend and path (eager, the registered op, torch.compile,
fused_pool.distributed), never a wrong number. First-order gradients taken with create_graph=True
are still right."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED, assert_close, cu_seqlens_of, kernel_backends

import fused_pool
import fused_pool.distributed as fd
from fused_pool import reference
from fused_pool.contract import MAX, MEAN, MEAN_MAX
from fused_pool.ops import kernels

CPU_BACKENDS = [pytest.param("torch", id="torch")] + [
    pytest.param(p.values[0], id=p.values[0]) for p in FUSED if p.values[1] == "cpu"
]
POOL_OPS = {"masked_mean": MEAN, "masked_max": MAX, "masked_mean_max": MEAN_MAX}
OPS = [*POOL_OPS, "attention_pool", "query_attention_pool"]
MESSAGE = "double backward"


def _inputs(op: str, varlen: bool):
    """(x, the op's second differentiable input or None, the call's keyword arguments)."""
    gen = torch.Generator().manual_seed(len(op) + varlen)
    if varlen:
        x = torch.randn(11, 8, generator=gen, dtype=torch.float64)
        kwargs = dict(cu_seqlens=cu_seqlens_of([3, 0, 8]))
        token_shape = (11,)
    else:
        x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
        mask = torch.rand(3, 5, generator=gen) > 0.3
        kwargs = dict(mask=mask)
        token_shape = (3, 5)
    other = None
    if op == "attention_pool":
        other = torch.randn(*token_shape, 2, generator=gen, dtype=torch.float64)
    elif op == "query_attention_pool":
        other = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    return x.requires_grad_(), None if other is None else other.requires_grad_(), kwargs


def _call(fn, x, other, kwargs, **extra):
    mask = kwargs.get("mask")
    rest = {k: v for k, v in kwargs.items() if k != "mask"}
    head = (x,) if other is None else (x, other)
    return fn(*head, mask, **rest, **extra)


def _first_order(out, wrt):
    """Gradients of a loss nonlinear in `out` (so the upstream gradient depends on x), with a graph."""
    return torch.autograd.grad(out.pow(2).sum(), wrt, create_graph=True)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_double_backward_raises_and_first_order_is_right(backend, op, varlen):
    x, other, kwargs = _inputs(op, varlen)
    wrt = (x,) if other is None else (x, other)
    grads = _first_order(_call(getattr(fused_pool, op), x, other, kwargs, backend=backend), wrt)
    expected = _first_order(_call(getattr(reference, op), x, other, kwargs), wrt)
    for grad, want in zip(grads, expected, strict=True):
        assert_close(grad, want)
    for grad in grads:
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(grad.pow(2).sum(), wrt, allow_unused=True)


@pytest.mark.parametrize("op", ["attention_pool", "query_attention_pool"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_double_backward_raises_with_a_constant_upstream_gradient(backend, op):
    """Attention's gradient depends on x (and scores / query) even when the upstream gradient is a
    constant: the second backward must reach the error, not see a constant."""
    x, other, kwargs = _inputs(op, varlen=False)
    out = _call(getattr(fused_pool, op), x, other, kwargs, backend=backend)
    dx, dother = torch.autograd.grad(out.sum(), (x, other), create_graph=True)
    for grad in (dx, dother):
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(grad.pow(2).sum(), (x, other), allow_unused=True)


@pytest.mark.parametrize("op", list(POOL_OPS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pool_gradient_of_a_constant_upstream_gradient_is_constant_or_raises(backend, op):
    """With a constant upstream gradient a pool's dx is piecewise constant in x: exactly as in the
    reference (PyTorch's own ops), it has no graph; if it has one, differentiating it raises."""
    x, _, kwargs = _inputs(op, varlen=False)
    out = _call(getattr(fused_pool, op), x, None, kwargs, backend=backend)
    (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    expected_out = _call(getattr(reference, op), x, None, kwargs)
    (expected,) = torch.autograd.grad(expected_out.sum(), x, create_graph=True)
    assert_close(dx, expected)
    assert not expected.requires_grad
    if dx.requires_grad:
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(dx.pow(2).sum(), x)


def _op_inputs(kind: str, x, other, kwargs, mode):
    """The registered op's inputs (fused_pool.specs' schema) for the public op's arguments."""
    mask, cu_seqlens = kwargs.get("mask"), kwargs.get("cu_seqlens")
    if kind == "pool":
        return (x, mask, cu_seqlens, None, mode)
    if kind == "attention":
        return (x, other, mask, cu_seqlens, None)
    return (x, other, mask, cu_seqlens, None, 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_op_double_backward_raises(backend, op):
    """The path torch.compile and direct torch.ops calls take (register_autograd)."""
    kind = "pool" if op in POOL_OPS else op.removesuffix("_pool")
    x, other, kwargs = _inputs(op, varlen=False)
    wrt = (x,) if other is None else (x, other)
    out = kernels(backend, kind).forward_op(*_op_inputs(kind, x, other, kwargs, POOL_OPS.get(op)))[0]
    eager = kernels(backend, kind).forward(*_op_inputs(kind, x.detach(), other, kwargs, POOL_OPS.get(op)))[0]
    assert_close(out, eager)
    grads = _first_order(out, wrt)
    for grad in grads:
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(grad.pow(2).sum(), wrt, allow_unused=True)


@pytest.mark.parametrize("op", ["masked_mean", "attention_pool", "query_attention_pool"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_double_backward_raises(backend, op):
    x, other, kwargs = _inputs(op, varlen=False)
    wrt = (x,) if other is None else (x, other)
    torch._dynamo.reset()
    fn = getattr(fused_pool, op)
    compiled = torch.compile(lambda *args: _call(fn, *args, kwargs, backend=backend), fullgraph=True)
    grads = _first_order(compiled(x, other), wrt)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(grads[0].pow(2).sum(), wrt, allow_unused=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_first_order_twice(backend):
    x, other, kwargs = _inputs("attention_pool", varlen=False)
    out = _call(fused_pool.attention_pool, x, other, kwargs, backend=backend)
    first = torch.autograd.grad(out.pow(2).sum(), (x, other), retain_graph=True)
    second = torch.autograd.grad(out.pow(2).sum(), (x, other))
    expected = torch.autograd.grad(_call(reference.attention_pool, x, other, kwargs).pow(2).sum(), (x, other))
    for a, b, want in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        assert_close(a, want)


# --- probe_attention_pool ---------------------------------------------------------------------------

PROBE_BACKENDS = [
    pytest.param(p.values[0], id=p.values[0])
    for p in kernel_backends("probe_attention")
    if p.values[1] == "cpu"
]


def _probe_inputs(varlen: bool):
    """(x, probes, the call's keyword arguments), float64."""
    gen = torch.Generator().manual_seed(23 + varlen)
    x = torch.randn(*((11,) if varlen else (3, 5)), 8, generator=gen, dtype=torch.float64)
    probes = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    kwargs = (
        dict(cu_seqlens=cu_seqlens_of([3, 0, 8]))
        if varlen
        else dict(mask=torch.rand(3, 5, generator=gen) > 0.3)
    )
    return x.requires_grad_(), probes.requires_grad_(), kwargs


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("backend", PROBE_BACKENDS)
def test_probe_attention_double_backward_raises(backend, varlen):
    """Eager: first-order gradients (with a graph, of a nonlinear loss and of a constant upstream
    gradient) equal the reference's; differentiating them raises."""
    x, probes, kwargs = _probe_inputs(varlen)
    wrt = (x, probes)
    out = _call(fused_pool.probe_attention_pool, x, probes, kwargs, backend=backend)
    grads = _first_order(out, wrt)
    for grad, want in zip(
        grads, _first_order(_call(reference.probe_attention_pool, x, probes, kwargs), wrt), strict=True
    ):
        assert_close(grad, want)
    constant_upstream = torch.autograd.grad(out.sum(), wrt, create_graph=True)
    for grad in (*grads, *constant_upstream):
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(grad.pow(2).sum(), wrt, allow_unused=True)


@pytest.mark.parametrize("backend", PROBE_BACKENDS)
def test_probe_attention_registered_and_compiled_double_backward_raise(backend):
    """The registered op (torch.ops and torch.compile's path) and a compiled call."""
    x, probes, kwargs = _probe_inputs(varlen=False)
    wrt = (x, probes)
    op = kernels(backend, "probe_attention").forward_op
    out = op(x, probes, kwargs["mask"], None, None, 0.5)[0]
    assert_close(out, reference.probe_attention_pool(x, probes, kwargs["mask"], scale=0.5))
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, b: fused_pool.probe_attention_pool(a, b, kwargs["mask"], backend=backend), fullgraph=True
    )
    for result in (out, compiled(x, probes)):
        grads = _first_order(result, wrt)
        for grad in grads:
            with pytest.raises(RuntimeError, match=MESSAGE):
                torch.autograd.grad(grad.pow(2).sum(), wrt, allow_unused=True)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_distributed_double_backward_raises(backend, op, one_rank_group):
    x, other, kwargs = _inputs(op, varlen=False)
    wrt = (x,) if other is None else (x, other)
    grads = _first_order(_call(getattr(fd, op), x, other, kwargs, backend=backend), wrt)
    expected = _first_order(_call(getattr(reference, op), x, other, kwargs), wrt)
    for grad, want in zip(grads, expected, strict=True):
        assert_close(grad, want)
    for grad in grads:
        with pytest.raises(RuntimeError, match=MESSAGE):
            torch.autograd.grad(grad.pow(2).sum(), wrt, allow_unused=True)


@pytest.mark.parametrize("op", ["first_token", "last_token"])
def test_token_second_derivatives_match_the_reference(op, one_rank_group):
    """first / last token are gathers (PyTorch's autograd; the distributed ones a custom Function
    whose backward is itself differentiable): their second derivatives are right, not refused."""
    x, _, kwargs = _inputs(op, varlen=False)
    weight = torch.randn(x.shape[-1], dtype=x.dtype, requires_grad=True)
    wrt = (x, weight)

    def second(fn):
        (dx,) = torch.autograd.grad((fn(x, kwargs["mask"]) * weight).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), wrt)

    for fn in (getattr(fused_pool, op), getattr(fd, op)):
        for grad, want in zip(second(fn), second(getattr(reference, op)), strict=True):
            assert_close(grad, want)
