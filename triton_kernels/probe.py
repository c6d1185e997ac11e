"""The probe_attention op kind on Triton, in its spec signatures (fused_pool.specs):
`probe_attention_fwd` and `probe_attention_bwd`. The kernels are in probe_kernels.py; split chunks
are merged by attention.py's combine kernel (probe p plays head p of a (B, P * H) output).

Forward results: out (B, P, H) and the softmax statistics (m, l) per (sequence, probe), in the
accumulation dtype (float32; float64 for float64 x): all that backward needs besides x.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..contract import accumulation_dtype
from .attention_kernels import attention_combine_kernel
from .launch import (
    TILE_WARPS,
    channel_block,
    chunk_arguments,
    kernel_cu_seqlens,
    launches_on_input_device,
    tile_launch,
    triton_accumulator,
)
from .probe_kernels import probe_bwd_kernel, probe_fwd_kernel
from .split_plan import geometry, plan_split

# Elements of a program's (probes, channels) accumulator for 2-byte x: 32 float32 registers a thread at
# 8 warps. 4-byte x (float32 dots run as tf32x3, each operand split in two) gets a quarter of that and
# forward token tiles of 16: with half, ptxas used all 255 registers and spilled up to 328 bytes.
ACCUMULATOR_ELEMENTS = 8192
# 8 warps. The backward also gets every register a thread can have as a budget: without one, ptxas
# picked an occupancy tier itself and spilled at its edge (24 bytes at 128 registers, sm_90 float32);
# the forward does better without (with it, Triton 3.9's sm_90 bf16 forward of 64 probes spilled).
FORWARD_LAUNCH = dict(num_warps=TILE_WARPS)
BACKWARD_LAUNCH = tile_launch(255)
# Probes a forward program scores at once (more: several probe blocks).
MAX_FORWARD_PROBES = 64


def _dot_precision(dtype: torch.dtype, num_probes: int = 1, backward: bool = False) -> str:
    """float32 dots as tf32x3 (float32 accuracy on tensor cores); others take their own type. The
    float32 backward of more than 16 probes takes plain float32 dots: its tf32x3 operand splits
    spilled on sm_80 at 255 registers."""
    if dtype != torch.float32 or (backward and num_probes > 16):
        return "ieee"
    return "tf32x3"


_DOT_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16}


def _dot_dtype(dtype: torch.dtype):
    """The dots' operand type: x's, except bfloat16 under Triton's interpreter, whose tl.dot
    multiplies the raw bits of bfloat16 (stored as uint16): float32 there (bfloat16 products are
    exact in float32, as on the GPU's tensor cores)."""
    if dtype == torch.bfloat16:
        return tl.float32 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else tl.bfloat16
    return _DOT_DTYPES[dtype]


def _budget(dtype: torch.dtype) -> int:
    """Tile elements of a (probes, channels) or (probes, K slice) block for x of this dtype."""
    return ACCUMULATOR_ELEMENTS if dtype.itemsize <= 2 else ACCUMULATOR_ELEMENTS // 4


def _channel_tiling(hidden: int, largest: int) -> tuple[int, int]:
    """(BLOCK_H, blocks): the fewest channel blocks of at most `largest` channels, each a power of two."""
    blocks = triton.cdiv(max(hidden, 1), largest)
    return max(16, triton.next_power_of_2(triton.cdiv(max(hidden, 1), blocks))), blocks


def forward_blocks(num_probes: int, hidden: int, dtype: torch.dtype) -> dict:
    """BLOCK_P, BLOCK_H, BLOCK_T, BLOCK_K of the forward; probe and channel blocks per chunk."""
    budget = _budget(dtype)
    block_p = min(MAX_FORWARD_PROBES, max(16, triton.next_power_of_2(num_probes)))
    block_h, channel_blocks = _channel_tiling(hidden, max(16, budget // block_p))
    return dict(
        BLOCK_P=block_p,
        BLOCK_H=block_h,
        BLOCK_T=32 if dtype.itemsize <= 2 else 16,
        BLOCK_K=max(16, min(64, budget // 2 // block_p)),
        probe_blocks=triton.cdiv(num_probes, block_p),
        channel_blocks=channel_blocks,
    )


def backward_blocks(num_probes: int, hidden: int, dtype: torch.dtype) -> dict:
    """The backward holds every probe: BLOCK_P = P (rounded up), channels as the budget allows."""
    budget = _budget(dtype)
    block_p = max(16, triton.next_power_of_2(num_probes))
    block_h, channel_blocks = _channel_tiling(hidden, max(16, budget // block_p))
    return dict(
        BLOCK_P=block_p,
        BLOCK_H=block_h,
        BLOCK_T=16,
        BLOCK_K=max(16, min(64, budget // 4 // block_p)),
        channel_blocks=channel_blocks,
    )


def probe_attention_fwd(
    x: torch.Tensor,
    probes: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H) / (T, H); probes (P, H). Returns (out (B, P, H), stats (B, P, 2))."""
    return _forward(x, probes, mask, cu_seqlens, max_seqlen, scale)


def probe_attention_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    probes: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x (contiguous), dprobes like probes); out, stats: what probe_attention_fwd returned."""
    return _backward(grad_out, x, probes, mask, cu_seqlens, out, stats, scale)


def _kernel_probes(probes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The probes as the dots read them: contiguous (P, H) in x's dtype (a P x H copy at most)."""
    return probes.to(x.dtype).contiguous()


@launches_on_input_device
def _forward(x, probes, mask, cu_seqlens, max_seqlen, scale):
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    num_probes, hidden = probes.shape
    geo = geometry(x, cu_seqlens, max_seqlen)
    num_seqs = geo.num_seqs
    acc = accumulation_dtype(x.dtype)
    out = torch.empty(num_seqs, num_probes, hidden, dtype=acc, device=x.device)
    stats = torch.empty(num_seqs, num_probes, 2, dtype=acc, device=x.device)
    if num_seqs == 0 or hidden == 0:
        return out, stats.zero_()
    blocks = forward_blocks(num_probes, hidden, x.dtype)
    per_chunk = blocks["probe_blocks"] * blocks["channel_blocks"]
    plan = plan_split(num_seqs, geo.num_rows, geo.longest, per_chunk, blocks["BLOCK_T"], x.device, cu_seqlens)
    part_m, part_l, part_acc = (
        torch.empty(plan.num_chunks if plan.split else 0, *shape, dtype=acc, device=x.device)
        for shape in ((num_probes,), (num_probes,), (num_probes, hidden))
    )
    rows = chunk_arguments(x, mask, cu_seqlens, geo, plan)
    acc_dtype = triton_accumulator(x.dtype)
    results = dict(out_ptr=out, stats_ptr=stats, part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc)
    probe_fwd_kernel[(plan.num_chunks * per_chunk,)](
        **rows,
        probes_ptr=_kernel_probes(probes, x),
        **results,
        H=hidden,
        P=num_probes,
        scale=scale,
        ACC_DTYPE=acc_dtype,
        DOT_DTYPE=_dot_dtype(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype),
        **blocks,
        **FORWARD_LAUNCH,
    )
    if plan.split:
        # Probe p is head p of a (B, P * H) output with heads of H channels.
        combine_block = channel_block(hidden)
        channel_blocks = triton.cdiv(hidden, combine_block)
        attention_combine_kernel[(num_seqs, num_probes * channel_blocks)](
            chunk_offsets_ptr=rows["chunk_offsets_ptr"],
            **results,
            H=num_probes * hidden,
            D=hidden,
            num_heads=num_probes,
            blocks_per_head=channel_blocks,
            splits=plan.splits,
            num_chunks=plan.num_chunks,
            VARLEN=varlen,
            ACC_DTYPE=acc_dtype,
            BLOCK_D=combine_block,
            num_warps=4,
        )
    return out, stats


@launches_on_input_device
def _backward(grad_out, x, probes, mask, cu_seqlens, out, stats, scale):
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    num_probes, hidden = probes.shape
    geo = geometry(x, cu_seqlens)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if geo.num_rows == 0 or hidden == 0 or geo.num_seqs == 0:
        return dx.zero_(), torch.zeros(probes.shape, dtype=probes.dtype, device=probes.device)
    # The gradient in x's dtype, as the dots read it, and g_p . out_p from that same gradient.
    grad = grad_out.to(x.dtype).contiguous()
    grad_dot_out = (grad.to(out.dtype) * out).sum(-1)
    blocks = backward_blocks(num_probes, hidden, x.dtype)
    channel_blocks = blocks["channel_blocks"]
    plan = plan_split(
        geo.num_seqs, geo.num_rows, geo.longest, channel_blocks, blocks["BLOCK_T"], x.device, cu_seqlens
    )
    dprobes_parts = torch.empty(plan.num_chunks, num_probes, hidden, dtype=out.dtype, device=x.device)
    probe_bwd_kernel[(plan.num_chunks * blocks["channel_blocks"],)](
        **chunk_arguments(x, mask, cu_seqlens, geo, plan),
        grad_ptr=grad,
        grad_dot_out_ptr=grad_dot_out,
        probes_ptr=_kernel_probes(probes, x),
        stats_ptr=stats,
        dx_ptr=dx,
        dprobes_part_ptr=dprobes_parts,
        H=hidden,
        P=num_probes,
        scale=scale,
        ACC_DTYPE=triton_accumulator(out.dtype),
        DOT_DTYPE=_dot_dtype(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype, num_probes, backward=True),
        **blocks,
        **BACKWARD_LAUNCH,
    )
    # Fixed-order sum of the per-chunk partials: deterministic, no atomics.
    return dx, dprobes_parts.sum(0).to(probes.dtype)
