"""The autograd Functions of the distributed ops: a replicated output from all-gathered partial
states, and a backward without communication.

Forward: the local forward kernel runs on the rank's pieces (fused_pool.distributed.layout), its
outputs become partial states (fused_pool.partials), every rank all-gathers them and combines them
in sequence-position order: the same bytes on every rank.

Backward (the Megatron / NeMo convention): the output is replicated, so each rank's incoming
gradient is the full gradient of the output, and each rank returns the gradient of its own tokens.
The local backward kernel runs with the GLOBAL states substituted for its forward's (fused_pool.specs
says why that is exact): the global sum of weights for mean; for max, the winning token's index on
the rank and slice that hold it and -1 elsewhere; the global softmax (m, l) and output for
attention. A replicated `query` gets this rank's contribution to dquery; the sum over ranks is the
full gradient. First order only, as on one device (fused_pool.ops.first_order_grads): a second
backward through these gradients raises. The token ops' backward is a plain `where`, differentiable
again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..contract import STATES
from ..ops import Kernels, first_order_grads
from ..partials import (
    MaxState,
    MeanState,
    SoftmaxState,
    TokenState,
    combine_max,
    combine_mean,
    combine_softmax,
    combine_tokens,
    mean_of,
    pool_states,
)
from ..specs import OpSpec
from .collective import Group, all_gather_states
from .layout import Pieces


@dataclass
class KernelCall:
    """One distributed op: which kernels, on which pieces, with which trailing arguments."""

    spec: OpSpec
    kernels: Kernels
    pieces: Pieces
    group: Group
    tail: tuple  # pool: (mode,); attention: (); query attention: (scale,)

    def inputs(self, x: Tensor, other: Tensor | None) -> tuple:
        """The local forward kernel's inputs; a pool forward writes its partial states (STATES)."""
        pieces = self.pieces
        head = (x,) if other is None else (x, other)
        tail = (self.tail[0] | STATES,) if self.spec.kind == "pool" else self.tail
        return (*head, pieces.mask, pieces.cu_seqlens, None, *tail)


def _combine_pool(call: KernelCall, outputs) -> tuple[Tensor, tuple]:
    """The pooled output (x's dtype) and the local forward outputs with the global states
    substituted: (unused, den per segment, argmax per segment)."""
    (mode,) = call.tail
    pieces = call.pieces
    mean, maximum = pool_states(outputs, mode)
    states = []
    if mean is not None:
        states += [pieces.per_piece(mean.total), pieces.per_piece(mean.den)]
    if maximum is not None:
        states += [pieces.per_piece(maximum.value), pieces.per_piece(maximum.index)]
    gathered = all_gather_states(states, call.group)
    parts, den, argmax = [], outputs[1], outputs[2]
    if mean is not None:
        total = combine_mean(MeanState(gathered.pop(0), gathered.pop(0)))
        parts.append(mean_of(total))
        den = pieces.per_segment(total.den)
    if maximum is not None:
        best, piece = combine_max(MaxState(gathered.pop(0), gathered.pop(0)))
        parts.append(best.value)
        on_this_segment = pieces.per_segment(piece) == pieces.segment_slice[:, None]
        argmax = torch.where(on_this_segment, pieces.per_segment(best.index), -1).to(torch.int32)
    out = torch.cat(parts, -1).to(call.pieces.x.dtype)
    return out, (out, den, argmax)


def _combine_attention(call: KernelCall, outputs) -> tuple[Tensor, tuple]:
    """The pooled output (accumulation dtype) and (global out, global stats) per segment."""
    pieces = call.pieces
    out, stats = outputs
    gathered = all_gather_states([pieces.per_piece(out), pieces.per_piece(stats)], call.group)
    total = combine_softmax(SoftmaxState(*gathered))
    return total.out, (pieces.per_segment(total.out), pieces.per_segment(total.stats))


class ReplicatedKernelOp(torch.autograd.Function):
    """out = combine(all-gathered partial states of the local forward); backward: the local
    backward kernel with the global states, no communication."""

    @staticmethod
    def forward(ctx, call: KernelCall, x: Tensor, other: Tensor | None):
        inputs = call.inputs(x, other)
        outputs = call.kernels.forward(*inputs)
        combine = _combine_pool if call.spec.kind == "pool" else _combine_attention
        out, substituted = combine(call, outputs)
        call.spec.save(ctx, inputs, substituted)
        ctx.call = replace(call, pieces=call.pieces.without_inputs())
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        call = ctx.call
        grad_segments = call.pieces.per_segment(grad_out)
        grads = first_order_grads(call.spec, ctx, call.kernels.backward, grad_segments)
        return None, grads[0], grads[1] if call.spec.kind != "pool" else None


def replicated_kernel_op(call: KernelCall, x: Tensor, other: Tensor | None = None) -> Tensor:
    return ReplicatedKernelOp.apply(call, x, other)


class _ReplicatedTokens(torch.autograd.Function):
    """Returns the combined rows; the gradient of sequence b goes to this rank's local row of b
    where this rank holds b's winning slice."""

    @staticmethod
    def forward(ctx, local_rows: Tensor, combined: Tensor, is_winner: Tensor, pieces: Pieces):
        ctx.save_for_backward(is_winner)
        ctx.pieces = pieces.without_inputs()
        return combined.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (is_winner,) = ctx.saved_tensors
        grad_rows = torch.where(is_winner[:, None], ctx.pieces.per_segment(grad_out), 0)
        return grad_rows, None, None, None


def replicated_tokens(local_rows: Tensor, found: Tensor, pieces: Pieces, group: Group, which: str) -> Tensor:
    """(B, H) first / last kept token of every sequence from each segment's (row, found)."""
    states = [pieces.per_piece(local_rows.detach()), pieces.per_piece(found)]
    rows, found_anywhere = all_gather_states(states, group)
    best, piece = combine_tokens(TokenState(rows, found_anywhere), which)
    is_winner = (pieces.per_segment(piece) == pieces.segment_slice) & (pieces.segment_seq >= 0)
    return _ReplicatedTokens.apply(local_rows, best.row, is_winner, pieces)
