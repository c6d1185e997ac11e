"""The C++/CUDA extension's ops called directly (torch.ops.fused_pool.ext_*), as the Python layer's
checks do not guard them: argument checks (device, dtype, shape, mode) that raise instead of reading
out of bounds, argmax stored relative to each varlen sequence's start, per-token varlen weights for
masked_mean, malformed cu_seqlens that never reach memory out of bounds. CPU kernels always; the
CUDA kernels where a GPU is present."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import poisoned_allocations

from fused_pool import reference
from fused_pool.backends import extension, extension_has_cuda

pytestmark = pytest.mark.skipif(extension() is None, reason="fused_pool._C is not built")

ops = torch.ops.fused_pool
MEAN, MAX, MEAN_MAX = 1, 2, 3
HAS_CUDA = torch.cuda.is_available() and extension() is not None and extension_has_cuda()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the extension's CUDA kernels")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.parametrize("name, layout, arg, bad, message", list(_cases()))
def test_ext_op_rejects_bad_argument_cpu(name, layout, arg, bad, message):
    args = _valid_inputs()[name, layout]
    index = ARGS[name].index(arg)
    args[index] = bad(args[index])
    op = getattr(ops, name).default
    with pytest.raises(RuntimeError, match=message):
        # The CPU kernel itself (the dispatcher would send a call with a meta tensor to the fake kernel).
        op.redispatch(_CPU_ONLY, *args)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_ext_op_valid_call_still_works_cpu(name, layout):
    args = _valid_inputs()[name, layout]
    outputs = getattr(ops, name)(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert torch.isfinite(outputs[0]).all()  # (attention stats hold m = -inf for the empty sequence)


@cuda_only
@pytest.mark.parametrize("name", ALL_OPS)
def test_ext_op_rejects_cpu_cu_seqlens_for_cuda_x(name):
    args = _valid_inputs("cuda")[name, "varlen"]
    args[ARGS[name].index("cu_seqlens")] = args[ARGS[name].index("cu_seqlens")].cpu()
    with pytest.raises(RuntimeError, match=r"cu_seqlens is on cpu but must be on cuda"):
        getattr(ops, name)(*args)
    torch.cuda.synchronize()


@cuda_only
def test_ext_op_rejects_cuda_tensor_for_cpu_x():
    args = _valid_inputs("cpu")["ext_pool_fwd", "varlen"]
    args[2] = args[2].cuda()  # the dispatcher picks the CUDA kernel, which must refuse CPU x
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor, got one on cpu"):
        ops.ext_pool_fwd(*args)


# --- masked_max argmax: the index within the sequence, not the global token -----------------------


def _expected_argmax(x, cu):
    rows = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        start, end = min(max(start, 0), len(x)), min(max(end, 0), len(x))
        end = max(end, start)
        rows.append(
            x[start:end].argmax(0).int() if end > start else torch.full((x.shape[1],), -1, dtype=torch.int32)
        )
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [MAX, MEAN_MAX])
@pytest.mark.parametrize("lengths", [[3, 0, 7], [100, 4900, 4000, 1]], ids=["short", "split"])
def test_varlen_argmax_is_relative_to_sequence_start_cpu(device, mode, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    # Few distinct values: many ties, whose first maximal position must win across split chunks.
    x = torch.randint(0, 4, (total, 24), generator=gen).float()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _, _, argmax = ops.ext_pool_fwd(x.to(device), None, cu.to(device), None, mode)
    assert torch.equal(argmax.cpu(), _expected_argmax(x, cu))

    # The backward reads the same: the gradient lands on row cu[b] + argmax[b].
    grad = torch.randn(len(lengths), 24 * (2 if mode == MEAN_MAX else 1), generator=gen)
    den = torch.tensor(lengths, dtype=torch.float32)
    dx = ops.ext_pool_bwd(
        grad.to(device), None, cu.to(device), den.to(device), argmax, [total, 24], x.dtype, mode
    )
    expected = torch.zeros(total, 24)
    g_max = grad[:, 24:] if mode == MEAN_MAX else grad
    for b, (start, length) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        if mode == MEAN_MAX and length:
            expected[start : start + length] += grad[b, :24] / length
        for c in range(24):
            if argmax[b, c] >= 0:
                expected[start + int(argmax[b, c]), c] += g_max[b, c]
    torch.testing.assert_close(dx.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_argmax_is_the_position_cpu(device):
    x = torch.randn(3, 6, 5)
    mask = torch.rand(3, 6) > 0.3
    mask[1] = False
    _, _, argmax = ops.ext_pool_fwd(x.to(device), mask.to(device), None, None, MAX)
    expected = x.masked_fill(~mask[..., None], -torch.inf).argmax(1).int()
    expected[~mask.any(1)] = -1
    assert torch.equal(argmax.cpu(), expected)


# --- varlen per-token weights (T,) for masked_mean --------------------------------------------------


def _weighted_means(x, w, cu):
    rows, dens = [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        total = w[start:end].double().sum()
        mean = (w[start:end, None].double() * x[start:end].double()).sum(0) / total
        rows.append(mean if total != 0 else torch.zeros(x.shape[1], dtype=torch.float64))
        dens.append(total)
    return torch.stack(rows), torch.stack(dens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float16)],
)
@pytest.mark.parametrize("lengths", [[3, 0, 5, 2], [40, 5000, 1200]], ids=["short", "split"])
def test_varlen_per_token_weights_cpu(device, x_dtype, w_dtype, lengths):
    gen = torch.Generator().manual_seed(7)
    total = sum(lengths)
    x = torch.randn(total, 16, generator=gen).to(x_dtype)
    w = torch.rand(2 * total, generator=gen).to(w_dtype)[::2]  # strided weights
    w[: lengths[0]] = 0  # a sequence whose weights sum to 0 pools to 0
    w[lengths[0]] = -0.5 if lengths[0] == 40 else 0  # negative weights are weights too
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    out, den, _ = ops.ext_pool_fwd(x.to(device), w.to(device), cu.to(device), None, MEAN)
    expected, expected_den = _weighted_means(x, w, cu)
    tol = dict(atol=1e-5, rtol=1e-5) if x_dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.cpu().double(), expected, **tol)
    torch.testing.assert_close(den.cpu().double(), expected_den, atol=1e-4, rtol=1e-5)

    grad = torch.randn(len(lengths), 16, generator=gen).to(device)
    no_argmax = torch.empty(0, dtype=torch.int32, device=device)
    dx = ops.ext_pool_bwd(grad, w.to(device), cu.to(device), den, no_argmax, list(x.shape), x_dtype, MEAN)
    segments = zip(cu[:-1].tolist(), cu[1:].tolist(), den.cpu().double().tolist(), strict=True)
    scale = torch.cat(
        [w[a:b].double() / d if d != 0 else torch.zeros(b - a, dtype=torch.float64) for a, b, d in segments]
    )
    expected_dx = scale[:, None] * grad.cpu().double().repeat_interleave(torch.tensor(lengths), 0)
    torch.testing.assert_close(dx.cpu().double(), expected_dx, **tol)


class _WeightedMean(torch.autograd.Function):
    """ext_pool_fwd / ext_pool_bwd wired by hand (independent of fused_pool.ops)."""

    @staticmethod
    def forward(ctx, x, w, cu):
        out, den, argmax = ops.ext_pool_fwd(x, w, cu, None, MEAN)
        ctx.save_for_backward(w, cu, den, argmax)
        ctx.x_shape, ctx.x_dtype = list(x.shape), x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        w, cu, den, argmax = ctx.saved_tensors
        return ops.ext_pool_bwd(grad, w, cu, den, argmax, ctx.x_shape, ctx.x_dtype, MEAN), None, None


def test_varlen_per_token_weights_gradcheck_cpu():
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda x: _WeightedMean.apply(x, w, cu), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_weights_keep_nonzero_tokens_for_max_cpu(device):
    x = torch.randn(10, 4)
    w = torch.tensor([0, 1, 2, 0, 0, 0.5, 1, 0, 3, 0])
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    out, _, argmax = ops.ext_pool_fwd(x.to(device), w.to(device), cu.to(device), None, MAX)
    kept = x.masked_fill(w[:, None] == 0, -torch.inf)
    torch.testing.assert_close(out.cpu(), torch.stack([kept[:5].max(0).values, kept[5:].max(0).values]))
    assert torch.equal(argmax.cpu(), torch.stack([kept[:5].argmax(0), kept[5:].argmax(0)]).int())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_mode", [False, True], ids=["scores", "query"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_attention_varlen_per_token_mask_cpu(device, query_mode, mask_dtype):
    """A per-token varlen mask (T,) drops tokens, which are never read (NaN there stays out), and
    equals pooling the kept tokens alone, forward and backward (fused_pool.distributed's zigzag
    layout drops padding this way)."""
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 4, 4, 11, 14], dtype=torch.int64)  # lengths 4, 0, 7, 3
    num_tokens, heads, hidden = 14, 2, 6
    keep = torch.rand(num_tokens, generator=gen) > 0.4
    keep[11:14] = False  # a sequence whose tokens are all dropped pools to 0
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    x[~keep] = float("nan")
    other = torch.randn(heads, hidden // heads, dtype=torch.float64, generator=gen)
    if not query_mode:
        other = torch.randn(num_tokens, heads, dtype=torch.float64, generator=gen)
    kept_cu = torch.tensor([0, *[int(keep[a:b].sum()) for a, b in zip(cu[:-1], cu[1:], strict=True)]]).cumsum(
        0
    )
    x_kept = x[keep].clone().requires_grad_()
    if query_mode:
        expected = reference.query_attention_pool(x_kept, other, cu_seqlens=kept_cu, scale=0.6)
        forward, backward, tail = ops.ext_query_attention_fwd, ops.ext_query_attention_bwd, (0.6,)
    else:
        expected = reference.attention_pool(x_kept, other[keep], cu_seqlens=kept_cu)
        forward, backward, tail = ops.ext_attention_fwd, ops.ext_attention_bwd, ()
    grad = torch.randn(len(cu) - 1, hidden, dtype=torch.float64, generator=gen)
    (expected_dx,) = torch.autograd.grad(expected, x_kept, grad)

    mask = keep.to(mask_dtype).to(device)
    args = (x.to(device), other.to(device), mask, cu.to(device))
    with poisoned_allocations():
        out, stats = forward(*args, None, *tail)
        dx, _ = backward(grad.to(device), *args, out, stats, *tail)
    torch.testing.assert_close(out.cpu(), expected.detach(), atol=1e-10, rtol=1e-10)
    assert torch.equal(dx.cpu()[~keep], torch.zeros_like(dx.cpu()[~keep]))
    torch.testing.assert_close(dx.cpu()[keep], expected_dx, atol=1e-10, rtol=1e-10)


# --- malformed cu_seqlens: clamped segments, no out-of-bounds access, bounded plans -----------------


def _clamped_segments(cu, num_rows):
    bounds = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        start = min(max(start, 0), num_rows)
        bounds.append((start, min(max(end, start), num_rows)))
    return bounds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_query_attention_non_monotone_cu_seqlens_cpu(device, x_dtype):
    """Every score the forward reads is computed: rows 4-9 of [0, 10, 2, 3, 4] belong to sequence 0
    although a binary search over cu_seqlens assigns them elsewhere."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=gen).to(x_dtype)
    query = torch.randn(2, 4, generator=gen)
    cu = torch.tensor([0, 10, 2, 3, 4], dtype=torch.int32)
    with poisoned_allocations():  # a score the kernels forget to write is NaN
        runs = [
            ops.ext_query_attention_fwd(x.to(device), query.to(device), None, cu.to(device), None, 0.7)
            for _ in "ab"
        ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    expected = torch.zeros(4, 8)
    for b, (start, end) in enumerate(_clamped_segments(cu, 20)):
        for head in range(2):
            rows = x[start:end, 4 * head : 4 * head + 4].float()
            if len(rows):
                p = torch.softmax(rows @ query[head] * 0.7, 0)
                expected[b, 4 * head : 4 * head + 4] = p @ rows
    torch.testing.assert_close(runs[0][0].cpu().float(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_cu_seqlens_cpu(device):
    """cu_seqlens alternating 0 and T: every other sequence is all of x, the others are empty. The
    CPU plan stays bounded (overlapping sequences past the chunk budget are not split)."""
    num_rows, hidden = 5000, 4
    x = torch.randint(-3, 4, (num_rows, hidden)).float()
    cu = torch.tensor([0, num_rows] * 300 + [0], dtype=torch.int32)
    out, den, argmax = ops.ext_pool_fwd(x.to(device), None, cu.to(device), None, MEAN_MAX)
    full = torch.cat([x.mean(0), x.max(0).values])
    torch.testing.assert_close(out[0::2].cpu(), full.expand(300, -1), atol=1e-5, rtol=1e-5)
    assert (out[1::2] == 0).all() and (den[1::2] == 0).all() and (argmax[1::2] == -1).all()
    assert torch.equal(argmax[0::2].cpu(), x.argmax(0).int().expand(300, -1))


@cuda_only
def test_overflowing_chunk_offsets_stay_in_bounds():
    """2,100,001 cu_seqlens entries alternating 0 and T, no max_seqlen: an int32 scan of the chunk
    counts overflowed to negative offsets and the combine read gigabytes before its buffers."""
    num_rows = 262144
    x = torch.randn(num_rows, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.zeros(2_100_001, dtype=torch.int32, device="cuda")
    cu[1::2] = num_rows
    for mode in (MEAN, MAX, MEAN_MAX):
        out, den, argmax = ops.ext_pool_fwd(x, None, cu, None, mode)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    scores = torch.randn(num_rows, 1, device="cuda")
    out, stats = ops.ext_attention_fwd(x, scores, None, cu[:200_001], None)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


# --- CUDA grids: the channel / head axis past 65535 blocks -----------------------------------------


@cuda_only
@pytest.mark.parametrize("mode", [MEAN, MAX, MEAN_MAX])
def test_pool_channel_tiles_past_grid_y_limit(mode):
    hidden = 65537 * 32  # 65537 channel tiles at one channel per thread
    x = torch.randn(2, 3, 2 * hidden, device="cuda")[..., ::2]  # strided channels: no vector loads
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool, device="cuda")
    out, den, argmax = ops.ext_pool_fwd(x, mask, None, None, mode)
    kept = x.masked_fill(~mask[..., None], -torch.inf)
    parts = ([(x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)] if mode & MEAN else []) + (
        [kept.max(1).values] if mode & MAX else []
    )
    torch.testing.assert_close(out, torch.cat(parts, 1))
    dx = ops.ext_pool_bwd(torch.ones_like(out), mask, None, den, argmax, list(x.shape), x.dtype, mode)
    torch.cuda.synchronize()
    assert dx[0, 1].abs().sum() == 0 and dx.sum() > 0


@cuda_only
def test_attention_heads_past_grid_y_limit():
    num_heads, head_dim = 65537, 2
    x = torch.randn(1, 3, num_heads * head_dim, device="cuda")
    query = torch.randn(num_heads, head_dim, device="cuda")
    out, stats = ops.ext_query_attention_fwd(x, query, None, None, None, 1.0)
    heads = x.view(1, 3, num_heads, head_dim)
    p = torch.softmax((heads * query).sum(-1), 1)
    torch.testing.assert_close(out.view(1, num_heads, head_dim), (p[..., None] * heads).sum(1))
    dx, dquery = ops.ext_query_attention_bwd(torch.ones_like(out), x, query, None, None, out, stats, 1.0)
    scores = (heads * query).sum(-1)
    out_s, stats_s = ops.ext_attention_fwd(x, scores, None, None, None)
    torch.testing.assert_close(out_s, out)
    ops.ext_attention_bwd(torch.ones_like(out), x, scores, None, None, out_s, stats_s)
    torch.cuda.synchronize()
    assert torch.isfinite(dx).all() and torch.isfinite(dquery).all()


# --- SASS: 128-bit stores and loads in the vectorized pool kernels -----------------------------------


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton  # bundles one under backends/nvidia/bin

    bundled = glob.glob(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    )
    return bundled[0] if bundled else None


def test_pool_kernels_use_128_bit_accesses_cpu(tmp_path):
    """pool_cuda.cu compiled for sm_90: the vectorized (VEC > 1) backward writes dx with one STG.E.128
    per 16 bytes (not four STG.E) and reads x / grad / argmax with LDG.E.128."""
    nvcc = shutil.which("nvcc")
    try:
        cuobjdump = _cuobjdump()
    except ImportError:
        cuobjdump = None
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    obj = tmp_path / "pool_cuda.o"
    source = ROOT / "csrc" / "cuda" / "pool_cuda.cu"
    subprocess.run([nvcc, "-c", "-arch=sm_90", "-O3", "-std=c++17", "-o", obj, source], check=True)
    dump = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True)
    if dump.returncode != 0:  # e.g. a cuobjdump older than nvcc
        pytest.skip(f"cuobjdump cannot read nvcc's output: {dump.stderr.strip()[:200]}")
    sass = dump.stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    for kind in ("pool_backward_kernel", "pool_forward_kernel"):
        # Vectorized instantiations: <half, 8>, <bf16, 8>, <float, 4>, <double, 2>.
        vectorized = [
            f for f in functions if re.match(rf"\S*{kind}I(6__halfLi8|13__nv_bfloat16Li8|fLi4|dLi2)E", f)
        ]
        assert len(vectorized) == 12, f"expected 12 vectorized {kind} instantiations"
        for function in vectorized:
            name = function.split()[0]
            stores = re.findall(r"\bSTG\.E(?:\.(\w+))?", function)
            loads = re.findall(r"\bLDG\.E(?:\.(\w+))?", function)
            assert "128" in loads, f"{name}: no LDG.E.128"
            if kind == "pool_backward_kernel":  # dx: nothing but 16-byte stores
                assert stores and set(stores) == {"128"}, f"{name}: stores {sorted(set(stores))}"
            else:  # out / partials 16 bytes; den and part_den scalars
                assert "128" in stores, f"{name}: no STG.E.128"
