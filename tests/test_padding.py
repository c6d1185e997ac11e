"""Padding-free helpers: cu_seqlens from masks and position ids, unpad / pad."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_generator

import fused_pool
from fused_pool import reference


def test_cu_seqlens_from_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    cu_seqlens = fused_pool.cu_seqlens_from_mask(mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 2, 5, 7]
    assert fused_pool.cu_seqlens_from_mask(mask.bool()).tolist() == [0, 2, 2, 5, 7]
    with pytest.raises(ValueError, match=r"attention_mask must be a \(B, L\) tensor"):
        fused_pool.cu_seqlens_from_mask(mask[0])


def test_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert fused_pool.cu_seqlens_from_position_ids(position_ids).tolist() == [0, 3, 4, 8]
    assert fused_pool.cu_seqlens_from_position_ids(position_ids[0], num_sequences=3).tolist() == [0, 3, 4, 8]
    cu_seqlens = fused_pool.cu_seqlens_from_position_ids(position_ids)
    assert cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match="position_ids must be"):
        fused_pool.cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("left", [False, True])
def test_unpad_pad_round_trip_and_pooling(left):
    gen = make_generator(0)
    x = torch.randn(3, 6, 4, generator=gen, requires_grad=True)
    lengths = torch.tensor([6, 2, 0])
    positions = torch.arange(6)
    mask = positions >= 6 - lengths[:, None] if left else positions < lengths[:, None]
    unpadded = fused_pool.unpad(x, mask)
    assert isinstance(unpadded, fused_pool.Unpadded)
    assert unpadded.cu_seqlens.tolist() == [0, 6, 8, 8] and unpadded.max_seqlen == 6
    assert torch.equal(unpadded.hidden_states, x[mask])
    restored = fused_pool.pad(unpadded.hidden_states, unpadded.indices, 3, 6)
    assert torch.equal(restored, torch.where(mask[..., None], x, 0))
    # Pooling the packed tokens equals pooling the padded batch.
    packed = reference.masked_mean(unpadded.hidden_states, cu_seqlens=unpadded.cu_seqlens)
    assert_close(packed, reference.masked_mean(x, mask))
    restored.sum().backward()
    assert torch.equal(x.grad, mask[..., None].expand_as(x).float())


def test_unpad_checks_shapes():
    with pytest.raises(ValueError, match="must agree on"):
        fused_pool.unpad(torch.zeros(2, 3, 4), torch.ones(2, 4))
