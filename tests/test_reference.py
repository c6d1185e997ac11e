"""The reference on hand-computed cases: it is the oracle, so its expected values come from
arithmetic done by hand here, never from the code under test."""

from __future__ import annotations

import math

import torch

from fused_pool import reference

NAN, INF = float("nan"), float("inf")


def grad_of(fn, x, *args, grad=None, **kwargs):
    x = x.clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out) if grad is None else grad)
    return out.detach(), dx


def test_mean_of_kept_tokens():
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [NAN, NAN]]])  # the padded row holds NaN
    mask = torch.tensor([[True, True, False]])
    out, dx = grad_of(reference.masked_mean, x, mask)
    assert torch.equal(out, torch.tensor([[1.5, 15.0]]))
    assert torch.equal(dx, torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]]))


def test_weighted_mean():
    x = torch.tensor([[[1.0], [2.0], [7.0]]])
    weights = torch.tensor([[1.0, 3.0, 0.0]])
    out, dx = grad_of(reference.masked_mean, x, weights)
    assert torch.equal(out, torch.tensor([[1.75]]))  # (1*1 + 3*2) / 4
    assert torch.equal(dx, torch.tensor([[[0.25], [0.75], [0.0]]]))


def test_integer_mask_keeps_nonzero():
    x = torch.tensor([[[2.0], [4.0], [9.0]]])
    out = reference.masked_mean(x, torch.tensor([[3, 1, 0]]))  # nonzero = kept, not a weight
    assert torch.equal(out, torch.tensor([[3.0]]))


def test_no_mask_keeps_everything():
    x = torch.tensor([[[1.0], [2.0], [6.0]]])
    assert torch.equal(reference.masked_mean(x), torch.tensor([[3.0]]))
    assert torch.equal(reference.masked_max(x), torch.tensor([[6.0]]))


def test_empty_sequence_is_zero_with_zero_gradient():
    x = torch.tensor([[[5.0]], [[NAN]]])
    mask = torch.tensor([[True], [False]])
    for fn in (reference.masked_mean, reference.masked_max, reference.masked_mean_max):
        out, dx = grad_of(fn, x, mask)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(dx[1], torch.zeros_like(dx[1]))


def test_max_gradient_goes_to_first_maximum():
    x = torch.tensor([[[2.0], [5.0], [5.0], [9.0]]])
    mask = torch.tensor([[True, True, True, False]])  # 9 is padding
    out, dx = grad_of(reference.masked_max, x, mask)
    assert torch.equal(out, torch.tensor([[5.0]]))
    assert torch.equal(dx, torch.tensor([[[0.0], [1.0], [0.0], [0.0]]]))


def test_max_nan_propagates_and_takes_gradient():
    x = torch.tensor([[[1.0], [NAN], [INF], [NAN]]])
    out, dx = grad_of(reference.masked_max, x)
    assert out.isnan().all()
    assert torch.equal(dx, torch.tensor([[[0.0], [1.0], [0.0], [0.0]]]))


def test_max_all_minus_inf():
    x = torch.tensor([[[-INF], [-INF]]])
    out, dx = grad_of(reference.masked_max, x)
    assert torch.equal(out, torch.tensor([[-INF]]))
    assert torch.equal(dx, torch.tensor([[[1.0], [0.0]]]))


def test_mean_max_concatenates():
    x = torch.tensor([[[1.0, -1.0], [3.0, -5.0]]])
    assert torch.equal(reference.masked_mean_max(x), torch.tensor([[2.0, -3.0, 3.0, -1.0]]))


def test_varlen_segments():
    x = torch.tensor([[1.0], [3.0], [10.0], [20.0], [60.0]])
    cu_seqlens = torch.tensor([0, 2, 2, 5])  # lengths 2, 0, 3
    assert torch.equal(reference.masked_mean(x, cu_seqlens=cu_seqlens), torch.tensor([[2.0], [0.0], [30.0]]))
    assert torch.equal(reference.masked_max(x, cu_seqlens=cu_seqlens), torch.tensor([[3.0], [0.0], [60.0]]))


def test_varlen_clamps_malformed_bounds():
    x = torch.tensor([[1.0], [2.0], [4.0]])
    cu_seqlens = torch.tensor([-5, 1, 0, 99])  # [0, 1), [1, 1) (decreasing: empty), [0, 3)
    assert torch.equal(reference.masked_mean(x, cu_seqlens=cu_seqlens), torch.tensor([[1.0], [0.0], [7 / 3]]))


def test_low_precision_accumulates_in_float32():
    # 4096 copies of 1 + 2^-7 (exact in bfloat16): a bfloat16 running sum would stall at 256.
    x = torch.full((1, 4096, 1), 1 + 2**-7, dtype=torch.bfloat16)
    assert reference.masked_mean(x).item() == 1 + 2**-7


def test_attention_pool_weights():
    x = torch.tensor([[[1.0, 2.0], [5.0, 6.0], [NAN, NAN]]])
    scores = torch.tensor([[0.0, math.log(3.0), 100.0]])  # softmax over kept -> [1/4, 3/4]
    mask = torch.tensor([[1, 1, 0]])
    out = reference.attention_pool(x, scores, mask)
    torch.testing.assert_close(out, torch.tensor([[1 / 4 + 15 / 4, 2 / 4 + 18 / 4]]))


def test_attention_pool_gradients():
    # Two tokens, scores (0, 0): p = (1/2, 1/2), out = (a + b) / 2.
    x = torch.tensor([[[2.0], [4.0]]], requires_grad=True)
    scores = torch.zeros(1, 2, requires_grad=True)
    out = reference.attention_pool(x, scores)
    out.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[0.5], [0.5]]]))
    # d out / d s_l = p_l (x_l - out) = 1/2 * (2 - 3), 1/2 * (4 - 3)
    torch.testing.assert_close(scores.grad, torch.tensor([[-0.5, 0.5]]))


def test_attention_pool_heads():
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0]]])
    scores = torch.tensor([[[0.0, 0.0], [0.0, -INF]]])  # head 0 averages, head 1 keeps token 0
    torch.testing.assert_close(reference.attention_pool(x, scores), torch.tensor([[2.0, 10.0]]))


def test_attention_pool_all_minus_inf_is_empty():
    x = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    scores = torch.tensor([[-INF, -INF], [0.0, -INF]], requires_grad=True)
    out, dx = grad_of(lambda t: reference.attention_pool(t, scores), x)
    assert torch.equal(out, torch.tensor([[0.0], [3.0]]))
    assert torch.equal(dx, torch.tensor([[[0.0], [0.0]], [[1.0], [0.0]]]))
    (ds,) = torch.autograd.grad(reference.attention_pool(x, scores).sum(), scores)
    assert torch.equal(ds, torch.zeros(2, 2))


def test_attention_pool_huge_scores():
    x = torch.tensor([[[1.0], [2.0]]])
    scores = torch.tensor([[1e4, -1e4]], dtype=torch.float16)
    assert torch.equal(reference.attention_pool(x, scores), torch.tensor([[1.0]]))


def test_query_attention_pool():
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
    query = torch.tensor([0.0, math.sqrt(2.0) * math.log(2.0)])
    # scores (x . q) / sqrt(2) = [0, log 2] -> p = [1/3, 2/3]
    out = reference.query_attention_pool(x, query)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2 / 3]]))
    # Two heads of one channel, scale 1: head 0 scores [3 q0, 0], head 1 [0, q1].
    query = torch.tensor([[0.0], [math.log(3.0)]])
    out = reference.query_attention_pool(x, query, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[1.5, 3 / 4]]))


def test_query_attention_pool_varlen_matches_padded():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]])
    query = torch.tensor([0.5, -0.25])
    packed = reference.query_attention_pool(x, query, cu_seqlens=torch.tensor([0, 1, 3]))
    padded = reference.query_attention_pool(
        torch.stack([torch.cat([x[:1], x[:1] * 0]), x[1:]]), query, torch.tensor([[1, 0], [1, 1]])
    )
    torch.testing.assert_close(packed, padded)
