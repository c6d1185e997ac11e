"""Context-parallel pooling: the sequence axis sharded across the ranks of a process group.

The same ops as fused_pool, with `group=` (default: the world) and `layout=`:

    masked_mean(x, mask=None, *, cu_seqlens=None, cu_seqlens_padded=None, group=None,
                layout="contiguous", backend=None) -> (B, H)
    masked_max, masked_mean_max, first_token, last_token (no backend=): likewise
    attention_pool(x, scores, mask=None, *, ...)
    query_attention_pool(x, query, mask=None, *, ..., scale=None)
    shard(t, *, rank, world_size, layout, dim, cu_seqlens_padded=None): a global tensor's piece

What each rank holds (fused_pool.distributed.layout):
- "contiguous": padded x (B, L_r, H) with mask (B, L_r), rank r's slice of the sequence axis; or
  varlen x (T_r, H), rank r's slice of the packed token axis, with the GLOBAL cu_seqlens on every
  rank. Slices may be uneven or empty; sequences may straddle ranks.
- "zigzag": every sequence cut into 2W equal slices, rank r holding slices r and 2W-1-r. Padded:
  L divisible by 2W. Varlen: `cu_seqlens_padded` (default: cu_seqlens) gives the padded lengths,
  each divisible by 2W, `cu_seqlens` the real ones; tokens past a real length are padding.

Forward: each rank pools its own tokens into small partial states (O(B H)), all-gathers them and
combines them in sequence-position order: the output is on every rank, bitwise identical, with the
single-device semantics (empty -> 0, the first maximal position wins across ranks, ...). Two
collectives per call: a metadata row (so that a bad input raises the same ValueError on every rank
instead of hanging one) and the states. The hidden states never travel.

Backward, no communication (the Megatron / NeMo convention): the output is replicated, so each
rank's incoming gradient is the full output gradient, and each rank returns the gradient of its
own tokens (x, scores). A replicated `query` gets this rank's contribution: the full dquery is the
SUM over the ranks of the group. So are the gradients of every parameter upstream of the pooled
output that all ranks share. A data-parallel reduction that averages over the context-parallel
ranks as well (FSDP or DDP over a dp x cp mesh divide by dp * cp) therefore yields the full
gradient divided by cp: scale the loss by cp, or sum over the cp dimension, as Megatron does.

Bad inputs (zigzag lengths not divisible by 2W, local lengths that do not add up to cu_seqlens,
a mask with varlen, different layouts or calls on different ranks) raise the same error, naming
the argument, on every rank. Works with gloo (CPU tensors, every CPU backend) and NCCL (CUDA).
"""

from __future__ import annotations

from torch import Tensor

from .._checks import (
    INDEX_DTYPES,
    check_pool_inputs,
    check_query,
    check_scale,
    check_scores,
    scale_or_default,
)
from ..backends import resolve_backend
from ..contract import MAX, MEAN, MEAN_MAX
from ..ops import kernels
from ..specs import SPECS
from ..tokens import gather_tokens, token_positions
from .autograd import KernelCall, replicated_kernel_op, replicated_tokens
from .collective import Group, LocalCall, exchange_metadata, resolve_group, token_offset
from .layout import LAYOUTS, contiguous_pieces, shard, zigzag_padded_pieces, zigzag_varlen_pieces

__all__ = [
    "attention_pool",
    "first_token",
    "last_token",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "query_attention_pool",
    "shard",
]


def _check_layout_args(layout, x: Tensor, cu_seqlens, cu_seqlens_padded) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cu_seqlens_padded is None:
        return
    if layout != "zigzag" or cu_seqlens is None:
        raise ValueError("cu_seqlens_padded is only used by layout='zigzag' with cu_seqlens (varlen)")
    if not isinstance(cu_seqlens_padded, Tensor):
        raise TypeError(f"cu_seqlens_padded must be a torch.Tensor, got {type(cu_seqlens_padded).__name__}")
    if cu_seqlens_padded.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens_padded must be int32 or int64, got dtype {cu_seqlens_padded.dtype}")
    if cu_seqlens_padded.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_padded must have the shape of cu_seqlens {tuple(cu_seqlens.shape)}, "
            f"got {tuple(cu_seqlens_padded.shape)}"
        )
    if cu_seqlens_padded.device != x.device:
        raise ValueError(f"cu_seqlens_padded is on {cu_seqlens_padded.device} but x is on {x.device}")


def _start(op: str, layout, group, local_checks):
    """Resolves the group, runs this rank's checks (keeping, not raising, their error) and exchanges
    the metadata, which raises the same error on every rank. Returns (Group, metadata rows, the
    checks' result)."""
    process_group, rank, world_size = resolve_group(group)
    where = Group(process_group, rank, world_size, layout if layout in LAYOUTS else "contiguous")
    try:
        result, error = local_checks(), None
    except Exception as caught:  # noqa: BLE001 - raised again, on every rank, by exchange_metadata
        result, error = None, caught
    rows = exchange_metadata(op, layout, where, None if result is None else result[0], error)
    return where, rows, result


def _pieces(where: Group, rows, x, mask, scores, cu_seqlens, cu_seqlens_padded, token_mask: bool):
    if where.layout == "contiguous":
        offset = token_offset(rows, where.rank) if cu_seqlens is not None else 0
        return contiguous_pieces(x, mask, scores, cu_seqlens, where.rank, offset)
    if cu_seqlens is None:
        return zigzag_padded_pieces(x, mask, scores, where.rank, where.world_size)
    padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
    return zigzag_varlen_pieces(x, mask, scores, cu_seqlens, padded, where.rank, where.world_size, token_mask)


def _pool(op, mode, x, mask, cu_seqlens, cu_seqlens_padded, group, layout, backend) -> Tensor:
    def local_checks():
        checked = check_pool_inputs(x, mask, cu_seqlens, None, varlen_weights=mode == MEAN)
        _check_layout_args(layout, checked, cu_seqlens, cu_seqlens_padded)
        chosen = resolve_backend(backend, checked.device)
        return LocalCall(checked, 0, cu_seqlens, cu_seqlens_padded), chosen

    where, rows, (call, chosen) = _start(op, layout, group, local_checks)
    pieces = _pieces(where, rows, call.x, mask, None, cu_seqlens, cu_seqlens_padded, token_mask=True)
    kernel_call = KernelCall(SPECS["pool"], kernels(chosen, "pool"), pieces, where, (mode,))
    return replicated_kernel_op(kernel_call, pieces.x)


def masked_mean(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
    backend: str | None = None,
) -> Tensor:
    """fused_pool.masked_mean of the sequences sharded across `group` -> (B, H) on every rank. A
    floating mask weights the mean: (B, L_r) padded, or the local per-token weights (T_r,) varlen."""
    return _pool("masked_mean", MEAN, x, mask, cu_seqlens, cu_seqlens_padded, group, layout, backend)


def masked_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
    backend: str | None = None,
) -> Tensor:
    """fused_pool.masked_max of the sequences sharded across `group` -> (B, H) on every rank; the
    gradient goes to the first maximal position of the whole sequence, on the rank that holds it."""
    return _pool("masked_max", MAX, x, mask, cu_seqlens, cu_seqlens_padded, group, layout, backend)


def masked_mean_max(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
    backend: str | None = None,
) -> Tensor:
    """cat(masked_mean, masked_max) of the sharded sequences -> (B, 2H) on every rank."""
    return _pool("masked_mean_max", MEAN_MAX, x, mask, cu_seqlens, cu_seqlens_padded, group, layout, backend)


def attention_pool(
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
    backend: str | None = None,
) -> Tensor:
    """fused_pool.attention_pool of the sharded sequences -> (B, H) on every rank. scores: the
    local (B, L_r) / (B, L_r, nh) or (T_r,) / (T_r, nh), sharded like x; each rank gets its own
    tokens' dscores."""

    def local_checks():
        checked = check_pool_inputs(x, mask, cu_seqlens, None)
        heads = check_scores(scores, checked, cu_seqlens is not None)
        _check_layout_args(layout, checked, cu_seqlens, cu_seqlens_padded)
        return LocalCall(checked, heads, cu_seqlens, cu_seqlens_padded), resolve_backend(
            backend, checked.device
        )

    where, rows, (call, chosen) = _start("attention_pool", layout, group, local_checks)
    per_head = scores if scores.dim() == call.x.dim() else scores.unsqueeze(-1)
    pieces = _pieces(where, rows, call.x, mask, per_head, cu_seqlens, cu_seqlens_padded, token_mask=True)
    kernel_call = KernelCall(SPECS["attention"], kernels(chosen, "attention"), pieces, where, ())
    return replicated_kernel_op(kernel_call, pieces.x, pieces.scores).to(call.x.dtype)


def query_attention_pool(
    x: Tensor,
    query: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """fused_pool.query_attention_pool of the sharded sequences -> (B, H) on every rank. `query`
    (H,) / (nh, H/nh) is replicated: each rank's dquery is its own tokens' contribution, and the
    full gradient is their sum over the group."""

    def local_checks():
        checked = check_pool_inputs(x, mask, cu_seqlens, None)
        heads = check_query(query, checked)
        check_scale(scale)
        _check_layout_args(layout, checked, cu_seqlens, cu_seqlens_padded)
        return LocalCall(checked, heads, cu_seqlens, cu_seqlens_padded), resolve_backend(
            backend, checked.device
        )

    where, rows, (call, chosen) = _start("query_attention_pool", layout, group, local_checks)
    head_dim = call.x.shape[-1] // call.heads
    tail = (scale_or_default(scale, head_dim),)
    pieces = _pieces(where, rows, call.x, mask, None, cu_seqlens, cu_seqlens_padded, token_mask=True)
    kernel_call = KernelCall(
        SPECS["query_attention"], kernels(chosen, "query_attention"), pieces, where, tail
    )
    query_heads = query.view(call.heads, head_dim)
    return replicated_kernel_op(kernel_call, pieces.x, query_heads).to(call.x.dtype)


def _token(op, which, x, mask, cu_seqlens, cu_seqlens_padded, group, layout) -> Tensor:
    def local_checks():
        checked = check_pool_inputs(x, mask, cu_seqlens, None)
        _check_layout_args(layout, checked, cu_seqlens, cu_seqlens_padded)
        return LocalCall(checked, 0, cu_seqlens, cu_seqlens_padded), None

    where, rows, (call, _) = _start(op, layout, group, local_checks)
    # Zigzag varlen: a segment per real part of each slice, so that padding is never gathered.
    pieces = _pieces(where, rows, call.x, mask, None, cu_seqlens, cu_seqlens_padded, token_mask=False)
    position, found = token_positions(pieces.x, pieces.mask, pieces.cu_seqlens, which)
    local_rows = gather_tokens(pieces.x, position, found)
    return replicated_tokens(local_rows, found, pieces, where, which)


def first_token(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
) -> Tensor:
    """fused_pool.first_token of the sharded sequences -> (B, H) on every rank: the first kept token
    of the whole sequence (0 if none); its gradient goes to the rank that holds it."""
    return _token("first_token", "first", x, mask, cu_seqlens, cu_seqlens_padded, group, layout)


def last_token(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
    group=None,
    layout: str = "contiguous",
) -> Tensor:
    """fused_pool.last_token of the sharded sequences -> (B, H) on every rank: the last kept token
    of the whole sequence (0 if none); its gradient goes to the rank that holds it."""
    return _token("last_token", "last", x, mask, cu_seqlens, cu_seqlens_padded, group, layout)
