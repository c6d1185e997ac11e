"""The attention op kinds on Triton, in their spec signatures (fused_pool.specs): attention_pool
(`attention_fwd`, `attention_bwd`; scores given) and query_attention_pool (`query_attention_fwd`,
`query_attention_bwd`; scores (x_head . query_head) * scale computed in the kernels). Both share
one forward and one backward launcher; the kernels are in attention_kernels.py and, for query heads
too wide for one tile, wide_query.py.

Forward results: out (B, H) and the softmax statistics (m, l) per (sequence, head), float32
(float64 for float64 x): all that backward needs besides x.
"""

from __future__ import annotations

import torch
import triton

from ..contract import accumulation_dtype
from . import wide_query
from .attention_kernels import attention_bwd_kernel, attention_combine_kernel, attention_fwd_kernel
from .launch import (
    TILE_REGISTERS,
    TILE_WARPS,
    channel_block,
    chunk_arguments,
    kernel_cu_seqlens,
    kernel_mask,
    launches_on_input_device,
    tile_launch,
    triton_accumulator,
)
from .split_plan import (
    check_padded_length,
    geometry,
    plan_split,
    resident_programs,
    rows_fit_int32,
    search_iters,
)


def attention_fwd(
    x: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H) / (T, H); scores (B, L, nh) / (T, nh). Returns (out (B, H), stats (B, nh, 2))."""
    return _forward(x, scores, None, mask, cu_seqlens, max_seqlen, 1.0)


def attention_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dscores like scores), both contiguous; out, stats: what attention_fwd returned."""
    return _backward(grad_out, x, scores, None, mask, cu_seqlens, out, stats, 1.0)


def query_attention_fwd(
    x: torch.Tensor,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H) / (T, H); query (nh, D). Returns (out (B, H), stats (B, nh, 2))."""
    return _forward(x, None, query.contiguous(), mask, cu_seqlens, max_seqlen, scale)


def query_attention_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x (contiguous), dquery like query); out, stats: what query_attention_fwd returned."""
    return _backward(grad_out, x, None, query.contiguous(), mask, cu_seqlens, out, stats, scale)


def _score_strides(scores, varlen):
    """(stride_b, stride_row, stride_head) of (B, L, nh) / (T, nh) scores."""
    return (0, *scores.stride()) if varlen else scores.stride()


def _is_wide(head_dim: int, query: bool) -> bool:
    """Query heads too wide for one tile take the kernels of wide_query.py."""
    return query and triton.next_power_of_2(head_dim) > wide_query.QUERY_MAX_BLOCK_D


def _blocks(head_dim: int, query: bool, backward: bool = False) -> tuple[int, int, dict]:
    """(BLOCK_D, BLOCK_R, launch options): query mode holds the whole head in one tile, unless it is
    wide; the attention-mode backward walks the head in blocks of at most 128 channels."""
    if _is_wide(head_dim, query):
        return wide_query.WIDE_BLOCK_D, wide_query.WIDE_BLOCK_R, dict(num_warps=wide_query.WIDE_NUM_WARPS)
    block_d = max(16, triton.next_power_of_2(head_dim)) if query else channel_block(head_dim)
    block_r = max(2, 4096 // block_d)
    if backward and not query:
        block_d = min(block_d, 128)
    # Query tiles of 2048+ channels, and the query backward's 1024 (it also holds the head's dquery
    # partial), need more than TILE_REGISTERS: registers as they need.
    large_head = query and (block_d >= 2048 or (backward and block_d >= 1024))
    return block_d, block_r, tile_launch(255 if large_head else TILE_REGISTERS)


@launches_on_input_device
def _forward(
    x: torch.Tensor,
    scores: torch.Tensor | None,
    query: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Either scores (B, L, nh) / (T, nh) or a contiguous query (nh, D): see the module docstring."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    is_query = query is not None
    num_heads = query.shape[0] if is_query else scores.shape[-1]
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    geo = geometry(x, cu_seqlens, max_seqlen)
    num_seqs = geo.num_seqs
    acc = accumulation_dtype(x.dtype)
    out = torch.empty(num_seqs, hidden, dtype=acc, device=x.device)
    stats = torch.empty(num_seqs, num_heads, 2, dtype=acc, device=x.device)
    if num_seqs == 0 or hidden == 0:
        return out, stats.zero_()
    block_d, block_r, launch = _blocks(head_dim, is_query)
    wide = _is_wide(head_dim, is_query)
    blocks_per_head = 1 if wide else triton.cdiv(head_dim, block_d)  # wide: a program walks its head
    plan = plan_split(
        num_seqs, geo.num_rows, geo.longest, num_heads * blocks_per_head, block_r, x.device, cu_seqlens
    )
    part_m, part_l, part_acc = (
        torch.empty(plan.num_chunks if plan.split else 0, *shape, dtype=acc, device=x.device)
        for shape in ((num_heads,), (num_heads,), (hidden,))
    )
    rows = chunk_arguments(x, mask, cu_seqlens, geo, plan)
    acc_dtype = triton_accumulator(x.dtype)
    results = dict(out_ptr=out, stats_ptr=stats, part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc)
    # The arguments the single-tile and the wide-head forward kernels share.
    shared = dict(
        **rows,
        query_ptr=query if is_query else x,
        **results,
        H=hidden,
        D=head_dim,
        num_heads=num_heads,
        scale=scale,
        ACC_DTYPE=acc_dtype,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        **launch,
    )
    if wide:
        wide_query.wide_query_fwd_kernel[(plan.num_chunks, num_heads)](**shared)
        # The combine takes the head in channel blocks, as in attention mode.
        block_d = channel_block(head_dim)
        blocks_per_head = triton.cdiv(head_dim, block_d)
    else:
        stride_sb, stride_sr, stride_sh = _score_strides(scores, varlen) if scores is not None else (0, 0, 0)
        attention_fwd_kernel[(plan.num_chunks, num_heads * blocks_per_head)](
            **shared,
            scores_ptr=scores if scores is not None else x,
            blocks_per_head=blocks_per_head,
            stride_sb=stride_sb,
            stride_sr=stride_sr,
            stride_sh=stride_sh,
            QUERY=is_query,
        )
    if plan.split:
        attention_combine_kernel[(num_seqs, num_heads * blocks_per_head)](
            chunk_offsets_ptr=rows["chunk_offsets_ptr"],
            **results,
            H=hidden,
            D=head_dim,
            num_heads=num_heads,
            blocks_per_head=blocks_per_head,
            splits=plan.splits,
            num_chunks=plan.num_chunks,
            VARLEN=varlen,
            ACC_DTYPE=acc_dtype,
            BLOCK_D=block_d,
            num_warps=TILE_WARPS if block_d >= 2048 else 4,
        )
    return out, stats


def _rows_per_program(num_rows: int, num_heads: int, block_r: int, device: torch.device, query: bool) -> int:
    """Attention mode: one row tile per program. Query mode: enough rows per program that the
    dquery partials (one H-vector per program) stay small next to x."""
    if not query:
        return block_r
    share = triton.cdiv(num_rows * num_heads, 2 * resident_programs(device))
    return max(4 * block_r, triton.cdiv(share, block_r) * block_r)


@launches_on_input_device
def _backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scores: torch.Tensor | None,
    query: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x (contiguous), dscores like scores (contiguous) or dquery like query)."""
    varlen = cu_seqlens is not None
    cu_seqlens = kernel_cu_seqlens(cu_seqlens)
    is_query = query is not None
    num_heads = stats.shape[1]
    hidden = x.shape[-1]
    head_dim = hidden // num_heads if num_heads else 0
    num_seqs, seq_len, num_rows, _, x_strides = geometry(x, cu_seqlens)
    stride_xb, stride_xr, stride_xh = x_strides
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    other = query if is_query else scores
    if num_rows == 0 or hidden == 0 or num_seqs == 0:
        return dx.zero_(), torch.zeros(other.shape, dtype=other.dtype, device=other.device)
    if not varlen:
        check_padded_length(seq_len)
    grad_out = grad_out.to(out.dtype).contiguous()
    block_d, block_r, launch = _blocks(head_dim, is_query, backward=True)
    rows_per_program = _rows_per_program(num_rows, num_heads, block_r, x.device, is_query)
    num_programs = triton.cdiv(num_rows, rows_per_program)
    if is_query:
        dscores = stats  # unused
        dquery_parts = torch.empty(num_programs, hidden, dtype=out.dtype, device=x.device)
    else:
        dscores = torch.empty(scores.shape, dtype=scores.dtype, device=x.device)
        dquery_parts = stats  # unused
    mask_view, (stride_mb, stride_mr) = kernel_mask(mask)
    # The arguments the single-tile and the wide-head backward kernels share.
    shared = dict(
        grad_ptr=grad_out,
        x_ptr=x,
        query_ptr=query if is_query else x,
        mask_ptr=mask_view if mask is not None else x,
        cu_seqlens_ptr=cu_seqlens if varlen else x,
        stats_ptr=stats,
        out_ptr=out,
        dx_ptr=dx,
        dquery_part_ptr=dquery_parts,
        num_seqs=num_seqs,
        seq_len=seq_len,
        num_rows=num_rows,
        H=hidden,
        D=head_dim,
        num_heads=num_heads,
        scale=scale,
        rows_per_program=rows_per_program,
        stride_xb=stride_xb,
        stride_xr=stride_xr,
        stride_xh=stride_xh,
        stride_mb=stride_mb,
        stride_mr=stride_mr,
        search_iters=search_iters(num_seqs),
        HAS_MASK=mask is not None,
        VARLEN=varlen,
        ROWS_INT32=rows_fit_int32(num_rows, block_r),
        ACC_DTYPE=triton_accumulator(out.dtype),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        **launch,
    )
    if _is_wide(head_dim, is_query):
        wide_query.wide_query_bwd_kernel[(num_programs, num_heads)](**shared)
    else:
        stride_sb, stride_sr, stride_sh = _score_strides(scores, varlen) if scores is not None else (0, 0, 0)
        attention_bwd_kernel[(num_programs, num_heads)](
            **shared,
            scores_ptr=scores if scores is not None else x,
            dscores_ptr=dscores,
            stride_sb=stride_sb,
            stride_sr=stride_sr,
            stride_sh=stride_sh,
            QUERY=is_query,
        )
    if is_query:
        # Fixed-order sum of the per-program partials: deterministic, no atomics.
        return dx, dquery_parts.sum(0).view(query.shape).to(query.dtype)
    return dx, dscores
