"""The collectives of a distributed call: one all-gather of a small metadata row (the checks
every rank must agree on, so that every rank raises the same error and none hangs), for varlen one
all-reduce of the offsets themselves, and one all-gather of the packed partial states.

Metadata (int64, one row per rank): the op, the layout, whether the local checks failed, B, H, the
head count, x's dtype, the local sequence length, and for varlen the last offsets and flags,
computed on their device (read back once, with the gathered rows: the call's host sync). Once the
ranks agree on B, varlen calls compare cu_seqlens (and, zigzag, cu_seqlens_padded) whole: an
all-reduce MAX of (offsets, ~offsets), B + 1 integers each, gives every rank each entry's largest
and smallest value, and one flag read back says whether any entry differs across ranks. (A
fingerprint, such as position-weighted sums, lets some differing vectors through.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from .layout import LAYOUTS, slice_owners, slices_per_rank

FIELDS = (
    "error",  # 1: the local checks raised (the message is all-gathered next)
    "op",
    "layout",
    "varlen",
    "batch",
    "hidden",
    "heads",
    "dtype",
    "local_len",  # L_r padded, T_r varlen
    "cu_last",  # cu_seqlens[-1]: T of the packed global batch
    "padded_last",  # cu_seqlens_padded[-1]
    "padded_bad",  # 1: cu_seqlens_padded does not start at 0, decreases, or has a length not divisible by 2W
    "padded_short",  # 1: a real length exceeds its padded length
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class LocalCall:
    """What a rank knows about its own call once its local checks passed."""

    x: Tensor
    heads: int
    cu_seqlens: Tensor | None
    cu_seqlens_padded: Tensor | None


@dataclass
class Group:
    """The process group of a call and how its ranks' slices are ordered."""

    group: object
    rank: int
    world_size: int
    layout: str

    @property
    def slots(self) -> int:
        return slices_per_rank(self.layout)


def resolve_group(group) -> tuple[object, int, int]:
    """(group, rank, world size); raises the same error on every rank when there is no group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fused_pool.distributed needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return group, rank, dist.get_world_size(group)


def _collective_device(group, x: Tensor | None) -> torch.device:
    """Where the metadata travels: for NCCL groups x's GPU (the current one if x is not on a GPU),
    else the CPU (gloo)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return x.device if x is not None and x.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _offsets(call: LocalCall) -> tuple[Tensor, Tensor]:
    """(cu_seqlens, cu_seqlens_padded) as int64; zigzag varlen slices by cu_seqlens_padded, which
    defaults to cu_seqlens (other layouts ignore it)."""
    cu = call.cu_seqlens.long()
    return cu, cu if call.cu_seqlens_padded is None else call.cu_seqlens_padded.long()


def _device_fields(call: LocalCall, world_size: int) -> Tensor:
    """cu_last, padded_last, padded_bad, padded_short, computed where cu_seqlens lives."""
    if call.cu_seqlens is None:
        return torch.zeros(4, dtype=torch.int64, device=call.x.device)
    cu, padded = _offsets(call)
    lengths = padded[1:] - padded[:-1]
    bad = (padded[0] != 0) | (lengths < 0).any() | (lengths % (2 * world_size) != 0).any()
    short = ((cu[1:] - cu[:-1]) > lengths).any()
    return torch.stack([cu[-1], padded[-1], bad.long(), short.long()])


def exchange_metadata(op: str, layout: str, group: Group, call: LocalCall | None, error: Exception | None):
    """All-gathers every rank's metadata row and raises, on every rank alike, the first problem:
    a rank whose local checks failed, or ranks that disagree or do not add up. Returns the rows."""
    device = _collective_device(group.group, None if call is None else call.x)
    layout_code = LAYOUTS.index(layout) if layout in LAYOUTS else -1
    if call is None:
        row = torch.tensor([1, 0, layout_code] + [0] * (len(FIELDS) - 3), dtype=torch.int64, device=device)
    else:
        x = call.x
        varlen = call.cu_seqlens is not None
        batch = call.cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
        local_len = x.shape[0] if varlen else x.shape[1]
        host = [
            0,
            0,
            layout_code,
            int(varlen),
            batch,
            x.shape[-1],
            call.heads,
            _DTYPES.index(x.dtype),
            local_len,
        ]
        fields = _device_fields(call, group.world_size).to(device)  # no host round trip
        row = torch.cat([torch.tensor(host, dtype=torch.int64, device=device), fields])
    row[FIELDS.index("op")] = _op_code(op)
    gathered = _all_gather(row, group).tolist()  # the call's one host sync
    rows = [dict(zip(FIELDS, values, strict=True)) for values in gathered]
    _raise_local_errors(rows, error, group)
    _check_same_call(rows, group)
    if rows[0]["varlen"]:
        _check_same_offsets(call, group, device)
    _check_slices(rows, group)
    return rows


_OPS = tuple(functional.__all__)  # the pooling ops; a call's op travels as its index here


def _op_code(op: str) -> int:
    return _OPS.index(op)


def _raise_local_errors(rows, error: Exception | None, group: Group) -> None:
    failed = [rank for rank, row in enumerate(rows) if row["error"]]
    if not failed:
        return
    messages = [None] * group.world_size
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(messages, mine, group=group.group)
    rank = failed[0]
    kind, message = messages[rank]
    error_type = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
    if error_type is RuntimeError and kind != "RuntimeError":
        message = f"{kind}: {message}"
    # The same error on every rank; on the rank that found it, chained to the original.
    raise error_type(f"{message} (on rank {rank} of {group.world_size})") from (
        error if rank == group.rank else None
    )


def _values(rows, field) -> list[int]:
    return [row[field] for row in rows]


def _check_same_call(rows, group: Group) -> None:
    """The op, the layout, padded or varlen, B, H, the head count and x's dtype."""
    world = group.world_size

    def differ(field) -> bool:
        return len(set(_values(rows, field))) > 1

    if differ("op"):
        names = [_OPS[code] for code in _values(rows, "op")]
        raise ValueError(f"every rank of the group must make the same call; the ranks called {names}")
    if differ("layout"):
        names = [LAYOUTS[code] for code in _values(rows, "layout")]
        raise ValueError(f"layout must be the same on every rank, got {names} on ranks 0..{world - 1}")
    if differ("varlen"):
        raise ValueError("cu_seqlens must be given on every rank or on none (padded and varlen ranks mixed)")
    varlen = bool(rows[0]["varlen"])
    checks = [
        ("batch", "cu_seqlens (its B + 1 entries)" if varlen else "x (its batch size B)"),
        ("hidden", "x (its hidden size H)"),
        ("heads", "scores / query (the head count nh)"),
        ("dtype", "x (its dtype)"),
    ]
    for field, what in checks:
        if differ(field):
            raise ValueError(
                f"{what} must be the same on every rank, got {_values(rows, field)} on ranks 0..{world - 1}"
            )


def _check_same_offsets(call: LocalCall, group: Group, device: torch.device) -> None:
    """cu_seqlens, and for zigzag cu_seqlens_padded, equal on every rank, entry by entry (B, so
    their length, already agrees). One all-reduce MAX of (offsets, ~offsets): ~v = -1 - v reverses
    the order without overflow, so its maximum is ~(the minimum)."""
    cu, padded = _offsets(call)
    named = [("cu_seqlens", cu)] + ([("cu_seqlens_padded", padded)] if group.layout == "zigzag" else [])
    offsets = torch.cat([t for _, t in named]).to(device)
    extremes = torch.cat([offsets, ~offsets])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group.group)
    highest, lowest = extremes[: offsets.numel()], ~extremes[offsets.numel() :]
    differs = highest != lowest
    if not bool(differs.any()):  # the same flag on every rank; varlen's one more host read
        return
    for part, (name, t) in enumerate(named):
        span = slice(part * t.numel(), (part + 1) * t.numel())
        where = differs[span].nonzero()
        if where.numel():
            i = int(where[0, 0])
            raise ValueError(
                f"{name} must be the same on every rank (the global offsets); {name}[{i}] ranges from "
                f"{int(lowest[span][i])} to {int(highest[span][i])} across the {group.world_size} ranks"
            )


def _check_slices(rows, group: Group) -> None:
    """The ranks' local lengths against the layout and the offsets."""
    world, layout = group.world_size, group.layout
    varlen = bool(rows[0]["varlen"])
    lengths = _values(rows, "local_len")
    parts = 2 * world
    if layout == "contiguous" and varlen and sum(lengths) != rows[0]["cu_last"]:
        raise ValueError(
            f"x: the ranks' local token counts {lengths} add up to {sum(lengths)}, but cu_seqlens ends "
            f"at T = {rows[0]['cu_last']}; with layout='contiguous' rank r holds the r-th slice of the "
            "packed tokens"
        )
    if layout == "zigzag" and not varlen and (len(set(lengths)) > 1 or lengths[0] % 2):
        raise ValueError(
            f"x: layout='zigzag' cuts every sequence into 2W = {parts} equal slices and rank r holds two "
            f"of them, so L must be divisible by {parts} and every local length equal to 2L/{parts}; got "
            f"local lengths {lengths}"
        )
    if layout == "zigzag" and varlen:
        if any(_values(rows, "padded_bad")):
            raise ValueError(
                f"cu_seqlens_padded (default: cu_seqlens) must start at 0 and every padded length must "
                f"be divisible by 2W = {parts} (zigzag cuts each sequence into 2W equal slices)"
            )
        if any(_values(rows, "padded_short")):
            raise ValueError("cu_seqlens: a sequence is longer than its padded length in cu_seqlens_padded")
        expected = rows[0]["padded_last"] // world
        if any(length != expected for length in lengths):
            raise ValueError(
                f"x: with layout='zigzag' every rank holds 2 of the 2W slices of every sequence, "
                f"cu_seqlens_padded[-1] / W = {expected} tokens; got local token counts {lengths}"
            )


def token_offset(rows, rank: int) -> int:
    """The first packed token of rank `rank`'s slice (contiguous varlen)."""
    return sum(row["local_len"] for row in rows[:rank])


# --- the partial states -------------------------------------------------------------------------


# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(flat: Tensor, group: Group) -> Tensor:
    """(N,) on every rank -> (W, N), row r from rank r."""
    gathered = flat.new_empty(group.world_size * flat.numel())
    _ALL_GATHER_SINGLE(gathered, flat, group=group.group)
    return gathered.view(group.world_size, flat.numel())


def _as_bytes(t: Tensor) -> Tensor:
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % 8))  # keep every field 8-byte aligned


def all_gather_states(states: list[Tensor], group: Group) -> list[Tensor]:
    """Every rank's (slots, B, ...) states -> (2W or W slices, B, ...) in sequence-position order,
    the same bytes on every rank. One all-gather of the states packed into one byte buffer."""
    gathered = _all_gather(torch.cat([_as_bytes(t) for t in states]), group)
    owners = torch.tensor(slice_owners(group.layout, group.world_size), device=gathered.device)
    out, offset = [], 0
    for t in states:
        nbytes = t.numel() * t.element_size()
        # reshape(-1) first: a zero-width slice keeps a row stride .view(dtype) cannot take
        field = gathered[:, offset : offset + nbytes].reshape(-1).view(t.dtype)
        field = field.reshape(group.world_size * t.shape[0], *t.shape[1:])
        out.append(field.index_select(0, owners))
        offset += nbytes + (-nbytes % 8)
    return out
