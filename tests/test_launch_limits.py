"""Launch limits: CUDA grids past 65535 blocks on the channel / head axis, offsets past 2^31
elements, chunk offsets that overflowed int32, bounded plans for overlapping cu_seqlens, the
selection of the wide-head kernels, 128-bit accesses in the vectorized pool kernels' SASS, the
softmax scale as a float64 kernel argument, kernels running on the input's GPU."""

from __future__ import annotations

import glob
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import triton.language as tl
from helpers import (
    EXTENSION_DEVICES,
    FUSED,
    assert_close,
    make_generator,
    needs_cuda_extension,
    needs_extension,
)

import fused_pool
from fused_pool import reference
from fused_pool.contract import MAX, MEAN, MEAN_MAX

ops = torch.ops.fused_pool  # the extension's ops, called directly
ROOT = Path(__file__).resolve().parents[1]


def test_wide_query_kernels_take_wide_heads():
    """Heads past the single-tile limit must not take the single-tile kernels (they spill)."""
    from fused_pool.triton_kernels import attention, wide_query

    assert not attention._is_wide(wide_query.QUERY_MAX_BLOCK_D, query=True)
    assert attention._is_wide(wide_query.QUERY_MAX_BLOCK_D + 1, query=True)
    assert not attention._is_wide(16384, query=False)  # attention mode blocks the head anyway


def _strided_past_int32(dtype=torch.bfloat16):
    """x (1, 5, 3) whose channel stride is 2^30 elements: channel 2 starts at element 2^31, where
    an int32 offset wraps negative. The 4 GiB storage is never touched beyond these 15 values."""
    storage = torch.empty(2**31 + 8, dtype=dtype)
    x = storage.as_strided((1, 5, 3), (0, 1, 2**30))
    values = torch.randn(1, 5, 3, generator=make_generator(3)).to(dtype)
    x.copy_(values)
    return x, values


@pytest.mark.parametrize("backend, device", [p for p in FUSED if p.values[1] == "cpu"])
def test_offsets_past_int32(backend, device):
    x, values = _strided_past_int32()
    for op in ("masked_mean", "masked_max", "masked_mean_max"):
        assert_close(getattr(fused_pool, op)(x, backend=backend), getattr(reference, op)(values))
    scores = torch.randn(1, 5, 3, generator=make_generator(4)).bfloat16()
    query = torch.randn(3, 1, generator=make_generator(5)).bfloat16()
    for op, other in (("attention_pool", scores), ("query_attention_pool", query)):
        out = getattr(fused_pool, op)(x, other, backend=backend)
        assert_close(out, getattr(reference, op)(values, other))


@pytest.mark.parametrize("kernel", ["attention_fwd_kernel", "attention_bwd_kernel", "wide_query"])
def test_scale_is_a_float64_kernel_argument(kernel):
    """Triton types a Python float argument float32: the query scale must be declared float64,
    or float64 scores are off by ~3e-8 relative on a GPU (the interpreter cannot show it)."""
    from fused_pool.triton_kernels import attention_kernels, wide_query

    jitted = (
        [wide_query.wide_query_fwd_kernel, wide_query.wide_query_bwd_kernel]
        if kernel == "wide_query"
        else [getattr(attention_kernels, kernel)]
    )
    for function in jitted:
        annotation = inspect.signature(function.fn).parameters["scale"].annotation
        assert annotation in ("tl.float64", tl.float64), (function.fn.__name__, annotation)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_run_on_the_inputs_gpu(backend):
    if backend not in fused_pool.available_backends():
        pytest.skip(f"{backend} backend not available")
    x = torch.randn(4, 33, 64, device="cuda:1", requires_grad=True)
    mask = torch.rand(4, 33, device="cuda:1") > 0.3
    query = torch.randn(64, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        for op, args in (("masked_mean_max", ()), ("query_attention_pool", (query,))):
            out = getattr(fused_pool, op)(x, *args, mask, backend=backend)
            out.sum().backward()
            assert out.device == torch.device("cuda:1")
            assert_close(out, getattr(reference, op)(x, *args, mask))


# --- malformed cu_seqlens: bounded plans, chunk offsets that fit -----------------------------------


@needs_extension
@pytest.mark.parametrize("device", EXTENSION_DEVICES)
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


@needs_cuda_extension
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


@needs_cuda_extension
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


@needs_cuda_extension
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


@needs_extension
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
