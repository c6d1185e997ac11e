"""Sequence geometry shared by the pooling kernels: where each sequence's rows are, how a long
sequence is split into chunks across programs, and which sequence a row belongs to.

Both layouts are one model: sequence b owns rows [start_b, end_b). Padded: rows are positions
0..L-1 (every sequence owns all L; the mask says which are kept). Varlen: rows are tokens and the
bounds come from cu_seqlens, clamped to [0, T] so that malformed values never reach memory out of
bounds. Row r of sequence b lives at x + b * stride_b + r * stride_row (stride_b = 0 for varlen).

Split plan. A program reduces a chunk of at most `chunk_rows` rows of one sequence. Padded:
sequence b has `splits` chunks, program p -> (p // splits, p % splits). Varlen: sequence b has
ceil(len_b / chunk_rows) chunks; their prefix sums (`chunk_offsets`, computed on the device, no
host sync) map program p to its sequence by binary search. Partial results are combined in chunk
order by a second kernel, so the result does not depend on scheduling.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..contract import accumulation_dtype

# A chunk shorter than this costs more in partials traffic than it gains in parallelism.
MIN_CHUNK_ROWS = 128
# Resident programs per SM assumed when sizing the grid: the split aims for two such waves.
PROGRAMS_PER_SM = 8


@triton.jit
def last_at_or_below(sorted_ptr, count, target, search_iters):
    """For each element of `target` (a scalar or a vector): the largest i in [0, count) with
    sorted_ptr[i] <= target (0 if none), by binary search of search_iters steps."""
    lo = tl.zeros(target.shape, dtype=tl.int32)
    hi = lo + count - 1
    for _ in range(search_iters):
        mid = (lo + hi + 1) // 2
        go = tl.load(sorted_ptr + mid).to(tl.int64) <= target
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def sequence_rows(seq, cu_seqlens_ptr, seq_len, num_rows, VARLEN: tl.constexpr):
    """[start, end) rows of sequence `seq` (int64 scalars)."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), num_rows)
        end = tl.minimum(tl.maximum(end, start), num_rows)
    else:
        start = tl.zeros([], dtype=tl.int64)
        end = start + seq_len
    return start, end


@triton.jit
def program_chunk(
    pid,
    chunk_offsets_ptr,
    cu_seqlens_ptr,
    num_seqs,
    seq_len,
    num_rows,
    chunk_rows,
    splits,
    search_iters,
    VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """(sequence, its first row, first row, end row) of the chunk that program `pid` reduces.

    Without SPLIT a program takes a whole sequence. Varlen programs past the last chunk get an
    empty range (the grid is an upper bound on the chunk count).
    """
    if SPLIT:
        if VARLEN:
            seq = last_at_or_below(chunk_offsets_ptr, num_seqs, pid, search_iters)  # its first chunk <= pid
            chunk = pid - tl.load(chunk_offsets_ptr + seq)
            in_range = pid < tl.load(chunk_offsets_ptr + num_seqs)
        else:
            seq = pid // splits
            chunk = pid % splits
            in_range = pid < num_seqs * splits
        start, end = sequence_rows(seq, cu_seqlens_ptr, seq_len, num_rows, VARLEN)
        first = start + chunk.to(tl.int64) * chunk_rows
        last = tl.minimum(first + chunk_rows, end)
        last = tl.where(in_range, last, first)
    else:
        seq = pid
        start, last = sequence_rows(seq, cu_seqlens_ptr, seq_len, num_rows, VARLEN)
        first = start
    return seq, start, first, last


@triton.jit
def sequence_chunks(seq, chunk_offsets_ptr, splits, num_chunks, VARLEN: tl.constexpr):
    """[first, end) chunk indices of sequence `seq`, clamped to the num_chunks partials allocated."""
    if VARLEN:
        first = tl.load(chunk_offsets_ptr + seq)
        end = tl.load(chunk_offsets_ptr + seq + 1)
    else:
        first = seq * splits
        end = first + splits
    return tl.minimum(first, num_chunks), tl.minimum(end, num_chunks)


@triton.jit
def row_sequence(
    tile_start,
    rows,
    cu_seqlens_ptr,
    num_seqs,
    seq_len,
    num_rows,
    search_iters,
    VARLEN: tl.constexpr,
    ROWS_INT32: tl.constexpr,
):
    """For a vector of global rows (int64) from tile_start on: the sequence of each row, its row as
    the forward addresses it (l padded, t varlen), its index within the sequence (l padded,
    t - start varlen) and whether the row belongs to its sequence at all. ROWS_INT32: every row
    index fits int32 (rows_fit_int32)."""
    if VARLEN:
        seq = last_at_or_below(cu_seqlens_ptr, num_seqs, rows, search_iters)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), num_rows)
        end = tl.minimum(tl.maximum(end, start), num_rows)
        position = rows
        index = rows - start
        inside = (rows >= start) & (rows < end)
    else:
        # rows = tile_start + [0, BLOCK): one division for the tile, int32 ones for its rows. An int64
        # division calls a subroutine whose frame is a stack spill: only when B * L >= 2^31.
        if ROWS_INT32:
            first_seq = (tl.cast(tile_start, tl.int32) // seq_len).to(tl.int64)
        else:
            first_seq = tile_start // seq_len
        offset = (rows - first_seq * seq_len).to(tl.int32)  # < seq_len + BLOCK <= 2^31 (launchers check)
        step = offset // seq_len
        seq = first_seq.to(tl.int32) + step
        position = (offset - step * seq_len).to(tl.int64)
        index = position
        inside = rows < num_rows
    return seq, position, index, inside


@triton.jit
def _chunk_offsets_kernel(cu_seqlens_ptr, offsets_ptr, num_seqs, num_rows, chunk_rows, BLOCK: tl.constexpr):
    """offsets[0] = 0, offsets[b + 1] = sum over sequences <= b of ceil(len / chunk_rows). One program."""
    carry = tl.zeros([], dtype=tl.int32)
    tl.store(offsets_ptr, carry)
    for b0 in range(0, num_seqs, BLOCK):
        seqs = b0 + tl.arange(0, BLOCK)
        valid = seqs < num_seqs
        start = tl.load(cu_seqlens_ptr + seqs, mask=valid, other=0).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seqs + 1, mask=valid, other=0).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), num_rows)
        end = tl.minimum(tl.maximum(end, start), num_rows)
        chunks = ((end - start + chunk_rows - 1) // chunk_rows).to(tl.int32)
        tl.store(offsets_ptr + seqs + 1, tl.cumsum(chunks, 0) + carry, mask=valid)
        carry += tl.sum(chunks, 0)


def rows_fit_int32(num_rows: int, block_rows: int) -> bool:
    return num_rows + block_rows < 2**31


# Padded backward kernels count a tile's rows from its first sequence in int32 (row_sequence).
MAX_PADDED_LENGTH = 2**31 - 2**16


def check_padded_length(length: int) -> None:
    if length > MAX_PADDED_LENGTH:
        raise ValueError(
            f"padded sequences of more than {MAX_PADDED_LENGTH} positions are not supported, got L = {length}"
        )


class SplitPlan(NamedTuple):
    """How the forward spreads the sequence axis over programs."""

    split: bool  # False: one program per (sequence, channel block), writing the final result
    chunk_rows: int  # rows per chunk when split
    splits: int  # padded: chunks per sequence
    num_chunks: int  # programs along the sequence axis (varlen: an upper bound)
    chunk_offsets: torch.Tensor | None  # varlen: (B + 1,) int32 prefix sums of chunks per sequence
    search_iters: int  # binary-search steps over B sequences


def launches_on_input_device(launcher):
    """Runs `launcher` with its first tensor argument's GPU as the current device, so that its
    kernels go there and not to torch's current device (a model spread over GPUs)."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return guarded


# Launch options of the row-tile kernels (4096-element tiles): 8 warps, and an explicit register
# budget. Without one, ptxas picks an occupancy tier itself and at a tier's edge spills a few bytes to
# local memory (8-byte spills at 64 / 80 / 128 / 168 registers on sm_80 and sm_90 under Triton 3.6 and
# 3.9, found by .ci/check_gpu_compile); given a budget it allocates within it, rematerializing
# instead of spilling. 128 registers keep two 8-warp programs resident per SM.
TILE_WARPS = 8
TILE_REGISTERS = 128


def tile_launch(max_registers: int = TILE_REGISTERS) -> dict:
    return dict(num_warps=TILE_WARPS, maxnreg=max_registers)


def search_iters(num_seqs: int) -> int:
    return max(1, math.ceil(math.log2(max(num_seqs, 1))) + 1)


def resident_programs(device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return sms * PROGRAMS_PER_SM


def plan_split(
    num_seqs: int,
    num_rows: int,
    longest: int,
    channel_blocks: int,
    block_rows: int,
    device: torch.device,
    cu_seqlens: torch.Tensor | None = None,
) -> SplitPlan:
    """Splits sequences longer than a balanced share of the work into chunks.

    num_rows: rows over all sequences (B * L padded, T varlen); longest: a bound on one sequence's
    rows (L; varlen: the max_seqlen hint, else T). Short sequences keep one program each.
    """
    iters = search_iters(num_seqs)
    share = triton.cdiv(num_rows * channel_blocks, 2 * resident_programs(device))
    chunk_rows = max(MIN_CHUNK_ROWS, triton.cdiv(share, block_rows) * block_rows)
    if longest <= chunk_rows:
        return SplitPlan(False, 0, 1, num_seqs, None, iters)
    if cu_seqlens is None:
        splits = triton.cdiv(longest, chunk_rows)
        return SplitPlan(True, chunk_rows, splits, num_seqs * splits, None, iters)
    # sum over b of ceil(len_b / chunk) <= T / chunk + B for non-overlapping segments; chunks past
    # this bound (only possible with malformed, overlapping cu_seqlens) are dropped, never run OOB.
    num_chunks = triton.cdiv(num_rows, chunk_rows) + num_seqs
    offsets = torch.empty(num_seqs + 1, dtype=torch.int32, device=cu_seqlens.device)
    _chunk_offsets_kernel[(1,)](cu_seqlens, offsets, num_seqs, num_rows, chunk_rows, BLOCK=1024)
    return SplitPlan(True, chunk_rows, 1, num_chunks, offsets, iters)


class Geometry(NamedTuple):
    """Where x's rows are, as the kernels address them (module docstring)."""

    num_seqs: int
    seq_len: int  # L padded, 0 varlen
    num_rows: int  # B * L padded, T varlen
    longest: int  # a bound on one sequence's rows: L, or varlen the max_seqlen hint (else T)
    strides: tuple[int, int, int]  # (stride_b, stride_row, stride_h); stride_b = 0 varlen


def geometry(x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None = None) -> Geometry:
    if cu_seqlens is not None:
        num_rows = x.shape[0]
        longest = num_rows if max_seqlen is None else min(max_seqlen, num_rows)
        return Geometry(cu_seqlens.shape[0] - 1, 0, num_rows, longest, (0, x.stride(0), x.stride(1)))
    batch, length = x.shape[0], x.shape[1]
    return Geometry(batch, length, batch * length, length, tuple(x.stride()))


def kernel_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """The mask as the kernels read it (bool viewed as uint8, no copy) and its (B, L) strides.

    A varlen mask (per-token weights (T,)) gets strides (0, stride): the kernels address the mask at
    seq * stride_b + row * stride_row, and a varlen row is the global token t, so they read w[t].
    """
    if mask is None:
        return None, (0, 0)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if mask.dim() == 1:
        return mask, (0, mask.stride(0))
    return mask, mask.stride()


def triton_accumulator(dtype: torch.dtype):
    """fused_pool.specs.accumulation_dtype of x's dtype as a Triton type (the ACC_DTYPE constexpr)."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def channel_block(hidden: int, largest: int = 256) -> int:
    """Channels per program: the largest power of two <= `largest` that wastes little of the last
    block (768 -> 256, 384 -> 128, 1000 -> 256, 1 -> 16)."""
    if hidden <= largest:
        return max(16, triton.next_power_of_2(hidden))
    block = largest
    while block > 64 and (triton.cdiv(hidden, block) * block - hidden) * 8 > hidden:
        block //= 2
    return block
