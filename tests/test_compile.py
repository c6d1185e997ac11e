"""The fused ops under torch.compile: no graph break, no recompile as shapes change, opcheck; the same
for the "torch" backend, the token ops, span_pool and probe_attention_pool."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED, SPAN_BACKENDS, assert_close, cu_seqlens_of, kernel_backends

import fused_pool
from fused_pool.contract import MAX, MEAN, MEAN_MAX
from fused_pool.ops import kernels

OPS = ["masked_mean", "masked_max", "masked_mean_max"]
ATTENTION_OPS = ["attention_pool", "query_attention_pool"]
TOKEN_OPS = ["first_token", "last_token"]


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_fullgraph_dynamic_matches_eager_without_recompiling(op, backend, device):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    compiled_padded = torch.compile(lambda x, m: fn(x, m, backend=backend), fullgraph=True, dynamic=True)
    compiled_varlen = torch.compile(
        lambda x, cu: fn(x, cu_seqlens=cu, backend=backend), fullgraph=True, dynamic=True
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(2, 9), (3, 17), (5, 4)]:
            x = torch.randn(batch, length, 12, device=device, requires_grad=True)
            mask = torch.rand(batch, length, device=device) > 0.3
            expected = fn(x, mask, backend=backend)
            (expected_dx,) = torch.autograd.grad(expected.sum(), x)
            out = compiled_padded(x, mask)
            (dx,) = torch.autograd.grad(out.sum(), x)
            assert_close(out, expected)
            assert_close(dx, expected_dx)

            lengths = list(range(2, 2 + batch))
            tokens = torch.randn(sum(lengths), 12, device=device)
            cu_seqlens = cu_seqlens_of(lengths, device=device)
            assert_close(
                compiled_varlen(tokens, cu_seqlens), fn(tokens, cu_seqlens=cu_seqlens, backend=backend)
            )


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_opcheck(mode, backend, device):
    op = kernels(backend, "pool").forward_op
    x = torch.randn(3, 10, 8, device=device, requires_grad=True)
    mask = torch.rand(3, 10, device=device) > 0.3
    for args in [
        (x, None, None, None, mode),
        (x, mask, None, None, mode),
        (x, mask.float(), None, None, mode),
        (x[0], None, cu_seqlens_of([4, 0, 6], device=device), None, mode),
        (x[0], None, cu_seqlens_of([4, 0, 6], torch.int64, device=device), 6, mode),
    ]:
        torch.library.opcheck(op, args)


def _second_input(op, token_shape, hidden, device):
    if op == "attention_pool":
        return torch.randn(*token_shape, 2, device=device, requires_grad=True)
    return torch.randn(2, hidden // 2, device=device, requires_grad=True)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_attention_fullgraph_dynamic_matches_eager_without_recompiling(op, backend, device):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, o, m: fn(x, o, m, backend=backend), fullgraph=True, dynamic=True)
    # Batch sizes differ from nh = 2: Dynamo's duck sizing gives equal sizes one symbol, so a
    # first call with B == nh would recompile when B changes.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 9), (4, 17), (6, 5)]:
            x = torch.randn(batch, length, 12, device=device, requires_grad=True)
            other = _second_input(op, (batch, length), 12, device)
            mask = torch.rand(batch, length, device=device) > 0.3
            expected = fn(x, other, mask, backend=backend)
            expected_grads = torch.autograd.grad(expected.sum(), (x, other))
            out = compiled(x, other, mask)
            grads = torch.autograd.grad(out.sum(), (x, other))
            assert_close(out, expected)
            for actual, wanted in zip(grads, expected_grads, strict=True):
                assert_close(actual, wanted)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("kind", ["attention", "query_attention"])
def test_attention_opcheck(kind, backend, device):
    op = kernels(backend, kind).forward_op
    x = torch.randn(3, 10, 8, device=device, requires_grad=True)
    mask = torch.rand(3, 10, device=device) > 0.3
    cu_seqlens = cu_seqlens_of([4, 0, 6], device=device)
    if kind == "attention":
        other, tokens_other = torch.randn(3, 10, 2, device=device), torch.randn(10, 1, device=device)
        extra = ()
    else:
        other, tokens_other = torch.randn(2, 4, device=device), torch.randn(1, 8, device=device)
        extra = (0.5,)
    other.requires_grad_()
    for args in [
        (x, other, None, None, None, *extra),
        (x, other, mask, None, None, *extra),
        (x[0], tokens_other, None, cu_seqlens, 6, *extra),
    ]:
        torch.library.opcheck(op, args)


# --- probe_attention_pool -------------------------------------------------------------------------

PROBE_BACKENDS = kernel_backends("probe_attention")


@pytest.mark.parametrize("backend, device", PROBE_BACKENDS)
def test_probe_attention_fullgraph_dynamic_without_recompiling(backend, device):
    padded = lambda x, p, m: fused_pool.probe_attention_pool(x, p, m, backend=backend)
    varlen = lambda x, p, cu: fused_pool.probe_attention_pool(x, p, cu_seqlens=cu, backend=backend)
    torch._dynamo.reset()
    compiled_padded = torch.compile(padded, fullgraph=True, dynamic=True)
    compiled_varlen = torch.compile(varlen, fullgraph=True, dynamic=True)
    # L (and T) change on every call; B, L, T never equal to each other, to P = 5 or to H = 12.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 9), (3, 17), (4, 7), (6, 26)]:
            x = torch.randn(batch, length, 12, device=device, requires_grad=True)
            probes = torch.randn(5, 12, device=device, requires_grad=True)
            mask = torch.rand(batch, length, device=device) > 0.3
            for fn, compiled, args in (
                (padded, compiled_padded, (x, probes, mask)),
                (
                    varlen,
                    compiled_varlen,
                    (x[0, : length - 1], probes, cu_seqlens_of([2, 0, length - 3], device=device)),
                ),
            ):
                expected = fn(*args)
                out = compiled(*args)
                assert_close(out, expected)
                grads = torch.autograd.grad(out.square().sum(), args[:2])
                expected_grads = torch.autograd.grad(expected.square().sum(), args[:2])
                for actual, wanted in zip(grads, expected_grads, strict=True):
                    assert_close(actual, wanted)


@pytest.mark.parametrize("backend, device", PROBE_BACKENDS)
def test_probe_attention_opcheck(backend, device):
    op = kernels(backend, "probe_attention").forward_op
    x = torch.randn(3, 10, 8, device=device, requires_grad=True)
    probes = torch.randn(4, 8, device=device, requires_grad=True)
    mask = torch.rand(3, 10, device=device) > 0.3
    for args in [
        (x, probes, None, None, None, 0.5),
        (x, probes, mask, None, None, 0.5),
        (x, probes, mask.float(), None, None, 0.35),
        (x[0], probes, None, cu_seqlens_of([4, 0, 6], device=device), None, 0.5),
        (x[0], probes, None, cu_seqlens_of([4, 0, 6], torch.int64, device=device), 6, 0.5),
    ]:
        torch.library.opcheck(op, args)


def _modules(backend):
    from fused_pool import nn as fnn

    return {
        "MeanPool": fnn.MeanPool(backend=backend),
        "MaxPool": fnn.MaxPool(backend=backend),
        "MeanMaxPool": fnn.MeanMaxPool(backend=backend),
        "CLSPool": fnn.CLSPool(),
        "LastTokenPool": fnn.LastTokenPool(),
        "AttentionPool-query": fnn.AttentionPool(16, num_heads=2, backend=backend),
        "AttentionPool-mlp": fnn.AttentionPool(16, num_heads=2, scorer="mlp", mlp_hidden=8, backend=backend),
        "WeightedLayerPool": fnn.WeightedLayerPool(
            num_layers=3, layer_start=1, base=fnn.MeanPool(backend=backend)
        ),
        "ConcatLayersPool": fnn.ConcatLayersPool(num_layers=2, base=fnn.MaxPool(backend=backend)),
    }


MODULE_NAMES = list(_modules(None))
# Five (B, L) pairs, all >= 2 and never equal to each other or to H = 16 or nh = 2 (Dynamo's duck
# sizing would otherwise give them one symbol).
SHAPES = [(3, 7), (5, 13), (6, 17), (9, 21), (11, 29)]


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_module_fullgraph_dynamic_no_recompile(name, backend, device):
    torch.manual_seed(0)
    module = _modules(backend)[name].to(device)
    multi_layer = name in ("WeightedLayerPool", "ConcatLayersPool")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in SHAPES:
            layers = [torch.randn(batch, length, 16, device=device, requires_grad=True) for _ in range(4)]
            x = layers if multi_layer else layers[0]
            mask = torch.rand(batch, length, device=device) > 0.3
            expected = module(x, mask)
            out = compiled(x, mask)
            assert_close(out, expected)
            params = [p for p in module.parameters() if p.requires_grad]
            wrt = layers + params
            grads = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True)
            expected_grads = torch.autograd.grad(expected.square().sum(), wrt, allow_unused=True)
            for actual, wanted in zip(grads, expected_grads, strict=True):
                assert (actual is None) == (wanted is None)
                if actual is not None:
                    assert_close(actual, wanted)


@pytest.mark.parametrize("backend, device", FUSED)
@pytest.mark.parametrize("name", ["MeanPool", "MeanMaxPool", "LastTokenPool", "AttentionPool-query"])
def test_module_varlen_no_recompile(name, backend, device):
    module = _modules(backend)[name].to(device)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in (
            [3, 4, 6],
            [5, 2, 8, 7],
            [9, 3, 3, 4, 10],
            [2, 2, 5, 6, 7, 8],
            [4, 9, 11, 5, 3, 6, 12],
        ):
            tokens = torch.randn(sum(lengths), 16, device=device, requires_grad=True)
            cu_seqlens = cu_seqlens_of(lengths, device=device)
            out = compiled(tokens, cu_seqlens=cu_seqlens)
            assert_close(out, module(tokens, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("backend, device", FUSED)
def test_sentence_transformers_pooling_compiles(backend, device):
    from fused_pool.nn import Pooling

    module = Pooling(16, ("cls", "mean", "max", "weightedmean", "lasttoken"), backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in SHAPES:
            x = torch.randn(batch, length, 16, device=device)
            mask = (torch.rand(batch, length, device=device) > 0.3).long()
            out = compiled({"token_embeddings": x, "attention_mask": mask})["sentence_embedding"]
            assert_close(out, module({"token_embeddings": x, "attention_mask": mask})["sentence_embedding"])


# --- the "torch" backend (plain PyTorch kernels behind the same op layer) ---------------------------


@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_torch_backend_opcheck(mode):
    op = kernels("torch", "pool").forward_op
    x = torch.randn(3, 10, 8, requires_grad=True)
    mask = torch.rand(3, 10) > 0.3
    for args in [(x, mask, None, None, mode), (x[0], None, cu_seqlens_of([4, 0, 6]), None, mode)]:
        torch.library.opcheck(op, args)
    query = torch.randn(2, 4, requires_grad=True)
    torch.library.opcheck(kernels("torch", "query_attention").forward_op, (x, query, mask, None, None, 0.5))


@pytest.mark.parametrize("op", ["masked_mean_max", "attention_pool"])
def test_torch_backend_fullgraph_dynamic(op):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    if op == "attention_pool":
        call = lambda x, m: fn(x, x[..., :2].detach().sum(-1), m, backend="torch")
    else:
        call = lambda x, m: fn(x, m, backend="torch")
    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 9), (4, 17), (6, 5)]:
            x = torch.randn(batch, length, 12, requires_grad=True)
            mask = torch.rand(batch, length) > 0.3
            out = compiled(x, mask)
            torch.testing.assert_close(out, call(x, mask))
            (dx,) = torch.autograd.grad(out.sum(), x)
            (expected,) = torch.autograd.grad(call(x, mask).sum(), x)
            torch.testing.assert_close(dx, expected)


# --- first_token / last_token -----------------------------------------------------------------------


@pytest.mark.parametrize("op", TOKEN_OPS)
def test_tokens_fullgraph_dynamic_without_recompiling(op):
    fn = getattr(fused_pool, op)
    torch._dynamo.reset()
    padded = torch.compile(lambda x, m: fn(x, m), fullgraph=True, dynamic=True)
    varlen = torch.compile(lambda x, cu: fn(x, cu_seqlens=cu), fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, length in [(3, 7), (5, 13), (6, 17)]:
            x = torch.randn(batch, length, 16, requires_grad=True)
            mask = torch.rand(batch, length) > 0.3
            out = padded(x, mask)
            assert torch.equal(out, fn(x, mask))
            (dx,) = torch.autograd.grad(out.sum(), x)
            (expected,) = torch.autograd.grad(fn(x, mask).sum(), x)
            assert torch.equal(dx, expected)
            lengths = list(range(2, 2 + batch))
            tokens = torch.randn(sum(lengths), 16)
            cu_seqlens = cu_seqlens_of(lengths)
            assert torch.equal(varlen(tokens, cu_seqlens), fn(tokens, cu_seqlens=cu_seqlens))


# --- span_pool ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mode", ["mean", "max", "mean_max"])
def test_span_fullgraph_dynamic_without_recompiling(mode, backend, device):
    call = lambda x, s, m: fused_pool.span_pool(x, s, m, mode=mode, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    # T and S change on every call, never equal to each other or to H = 12.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for num_tokens, num_spans in [(9, 4), (17, 7), (30, 5), (23, 11)]:
            x = torch.randn(num_tokens, 12, device=device, requires_grad=True)
            starts = torch.randint(0, num_tokens, (num_spans,), device=device)
            spans = torch.stack([starts, (starts + torch.randint(0, 6, (num_spans,), device=device))], 1)
            mask = torch.rand(num_tokens, device=device)
            expected = call(x, spans, mask)
            (expected_dx,) = torch.autograd.grad(expected.square().sum(), x)
            out = compiled(x, spans, mask)
            (dx,) = torch.autograd.grad(out.square().sum(), x)
            assert_close(out, expected)
            assert_close(dx, expected_dx)


@pytest.mark.parametrize("backend, device", SPAN_BACKENDS)
@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_span_opcheck(mode, backend, device):
    op = kernels(backend, "span").forward_op
    x = torch.randn(10, 8, device=device, requires_grad=True)
    spans = torch.tensor([[0, 4], [2, 9], [5, 5], [7, 12]], device=device)
    mask = torch.rand(10, device=device) > 0.3
    for args in [
        (x, spans, None, mode),
        (x, spans.int(), mask, mode),
        (x, spans, mask.float(), mode),
        (x, spans[:0], None, mode),
    ]:
        torch.library.opcheck(op, args)
