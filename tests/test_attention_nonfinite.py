"""Attention pooling with non-finite values and zero-width heads, on every backend (issue 21).

The rule (README "Semantics"): a head whose kept scores are all -inf, or that has no kept token,
pools to 0 with zero gradients. Otherwise the weights are torch.softmax of the kept scores, so a
NaN or +inf kept score (from the scores, from a NaN token in query mode, or from a nan / inf
`scale`) makes the whole head NaN, gradients included, and out = sum(p * x) lets a kept NaN token
through even where its weight is 0. Padding still never counts. Every case is checked against
fused_pool.reference (outputs, gradients, NaN positions), also across split sequences and in the
distributed combine (fused_pool.partials.combine_softmax).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FUSED,
    assert_close,
    check_attention,
    cu_seqlens_of,
    make_generator,
    make_query,
    make_scores,
    poison_padding,
    stable_seed,
)

import fused_pool
from fused_pool import reference
from fused_pool.ops import kernels
from fused_pool.partials import SoftmaxState, combine_softmax

NAN, INF = float("nan"), float("inf")
BACKENDS = [*FUSED, pytest.param("torch", "cpu", id="torch-cpu")]
TRITON = [p for p in FUSED if p.values[0] == "triton"]
# Kept scores of one head that torch.softmax turns into NaN weights.
BAD_SCORES = [[NAN], [INF], [INF, INF], [INF, -INF], [NAN, -INF], [NAN, INF]]


def _batch(device, gen, num_heads, hidden=8, length=11):
    """x (4, L, H) and scores with seq 0 ordinary (the caller spoils it), seq 1 ordinary, seq 2's
    kept scores all -inf (empty), seq 3 half padding whose x and scores are NaN."""
    x = torch.randn(4, length, hidden, generator=gen).to(device)
    scores = make_scores((4, length), num_heads, torch.float32, device, gen).reshape(4, length, -1)
    mask = torch.ones(4, length, dtype=torch.bool, device=device)
    mask[:, 1] = False  # padding inside every sequence
    mask[3, length // 2 :] = False
    scores[2] = -INF
    scores[~mask] = NAN
    return poison_padding(x, mask), scores, mask


def _assert_head_nan(out, grads, seq, head, num_heads, mask):
    """Head `head` of `seq` NaN in the output and in every kept token's gradient; padding's
    gradients 0; the other heads finite."""
    dx, dother = grads
    width = out.shape[-1] // num_heads
    channels = slice(head * width, (head + 1) * width)
    assert out[seq, channels].isnan().all()
    others = torch.ones(out.shape[-1], dtype=torch.bool)
    others[channels] = False
    assert out[seq, others].isfinite().all()
    kept = mask[seq]
    assert dx[seq][kept][:, channels].isnan().all() and not dx[seq][~kept].any()
    if dother.dim() == 3:  # dscores (B, L, nh)
        assert dother[seq][kept][:, head].isnan().all() and not dother[seq][~kept].any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("bad", BAD_SCORES, ids=str)
def test_nonfinite_kept_score_makes_the_head_nan(bad, num_heads, backend, device):
    gen = make_generator(stable_seed("bad scores", bad, num_heads))
    x, scores, mask = _batch(device, gen, num_heads)
    head = num_heads - 1
    scores[0, 2 : 2 + len(bad), head] = torch.tensor(bad)
    if num_heads == 1:
        scores = scores[..., 0]
    out, grads = check_attention("attention_pool", backend, x, scores, mask)
    grads = (grads[0], grads[1].reshape(*scores.shape[:2], num_heads))
    _assert_head_nan(out, grads, 0, head, num_heads, mask)
    assert out[1].isfinite().all() and out[3].isfinite().all()
    assert not out[2].any() and not grads[0][2].any() and not grads[1][2].any()  # all -inf: empty


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("num_heads", [1, 2])
def test_query_nan_token_makes_its_head_nan(num_heads, backend, device):
    gen = make_generator(stable_seed("nan token", num_heads))
    x, _, mask = _batch(device, gen, num_heads)
    head = num_heads - 1
    x[0, 3, head * 8 // num_heads + 1] = NAN  # one channel of a kept token
    query = make_query(8, num_heads, torch.float32, device, gen)
    out, (dx, dquery) = check_attention("query_attention_pool", backend, x, query, mask)
    _assert_head_nan(out, (dx, dquery), 0, head, num_heads, mask)
    assert out[1:].isfinite().all() and dquery.reshape(num_heads, -1)[head].isnan().all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_nan_token_reaches_its_channel_even_with_zero_weight(backend, device):
    """out = sum(p x): a kept NaN token makes its channel NaN, also where its score is -inf (p = 0,
    0 * NaN); in a head whose kept scores are all -inf it does not count (empty head)."""
    gen = make_generator(3)
    x, scores, mask = _batch(device, gen, 2)
    x[0, 3, 1] = NAN  # head 0 of seq 0, score finite
    x[1, 4, 5] = NAN  # head 1 of seq 1, score -inf
    scores[1, 4, 1] = -INF
    x[2, 5, 2] = NAN  # seq 2: every kept score -inf
    out, (dx, dscores) = check_attention("attention_pool", backend, x, scores, mask)
    assert out[0, 1].isnan() and out[0].isnan().sum() == 1 and dscores[0][mask[0]][:, 0].isnan().all()
    assert out[1, 5].isnan() and out[1].isnan().sum() == 1 and dscores[1][mask[1]][:, 1].isnan().all()
    assert not out[2].any() and not dx[2].any() and not dscores[2].any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("scale", [NAN, INF, -INF], ids=str)
def test_nonfinite_scale(scale, backend, device):
    gen = make_generator(4)
    x, _, mask = _batch(device, gen, 2)
    mask[2] = False  # no kept token: still 0
    query = make_query(8, 2, torch.float32, device, gen)
    out, (dx, dquery) = check_attention("query_attention_pool", backend, x, query, mask, scale=scale)
    for seq in (0, 1):
        assert out[seq].isnan().all() and dx[seq][mask[seq]].isnan().all() and not dx[seq][~mask[seq]].any()
    assert not out[2].any() and not dx[2].any() and dquery.isnan().all()
    if scale == INF:  # seq 3 head 0: every kept x . q < 0, every score -inf: an empty head
        assert not out[3, :4].any() and not dx[3, :, :4].any() and out[3, 4:].isnan().all()
    # Every sequence empty: zeros, whatever the scale.
    out, (dx, dquery) = check_attention("query_attention_pool", backend, x, query, mask & False, scale=scale)
    assert not out.any() and not dx.any() and not dquery.any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("where", ["first_chunk", "last_chunk"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=str)
def test_split_sequences_propagate(bad, where, backend, device):
    """Sequences long enough to be split across programs (triton) / chunks (cpu): the merge of the
    chunks keeps a NaN / +inf score's NaN, wherever the chunk that holds it comes."""
    length = 2100  # cpu: 2048-row chunks; triton: a few hundred rows
    gen = make_generator(stable_seed("split", bad, where))
    clean = torch.randn(2, length, 16, generator=gen).to(device)
    mask = (torch.rand(2, length, generator=gen) > 0.2).to(device)
    row = 10 if where == "first_chunk" else length - 20
    mask[:, row] = True
    x = poison_padding(clean.clone(), mask)
    scores = make_scores((2, length), 2, torch.float32, device, gen)
    scores[0, row, 1] = bad
    out, grads = check_attention("attention_pool", backend, x, scores, mask)
    _assert_head_nan(out, grads, 0, 1, 2, mask)
    assert out[1].isfinite().all()
    x[1, row, 3] = NAN  # query mode: a NaN token in seq 1's head 0
    query = make_query(16, 2, torch.float32, device, gen)
    out, grads = check_attention("query_attention_pool", backend, x, query, mask)
    _assert_head_nan(out, grads, 1, 0, 2, mask)
    assert out[0].isfinite().all()
    cu_seqlens = cu_seqlens_of([length, 7, length], device=device)
    tokens = torch.cat([clean[0], clean[1, :7], clean[0]])
    token_scores = torch.cat([scores[0], scores[1, :7], scores[1]])
    out, _ = check_attention("attention_pool", backend, tokens, token_scores, cu_seqlens=cu_seqlens)
    assert out[0, 8:].isnan().all() and out[0, :8].isfinite().all() and out[1:].isfinite().all()


@pytest.mark.parametrize("backend, device", TRITON)
@pytest.mark.parametrize("row", [10, 280])
def test_wide_query_heads_propagate(narrow_tiles, row, backend, device):
    """The Triton kernels for heads wider than one tile (forced at small sizes), on sequences split
    into 128-row chunks: a NaN token, a nan scale."""
    gen = make_generator(stable_seed("wide", row))
    x = torch.randn(2, 290, 2 * 20, generator=gen).to(device)
    mask = (torch.rand(2, 290, generator=gen) > 0.2).to(device)
    mask[:, row] = True
    x = poison_padding(x, mask)
    x[0, row, 25] = NAN  # head 1 of seq 0
    query = make_query(40, 2, torch.float32, device, gen)
    out, grads = check_attention("query_attention_pool", backend, x, query, mask)
    _assert_head_nan(out, grads, 0, 1, 2, mask)
    assert out[1].isfinite().all()
    mask[0] = False
    out, (dx, _) = check_attention("query_attention_pool", backend, x, query, mask, scale=NAN)
    assert not out[0].any() and out[1].isnan().all() and not dx[0].any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=str)
def test_combine_softmax_propagates(bad, backend, device):
    """The distributed ops' merge of per-piece (out, stats): a piece whose softmax went NaN makes
    the merged head NaN, wherever the piece comes, and empty pieces still have no say."""
    gen = make_generator(stable_seed("combine", bad))
    x = torch.randn(3, 24, 8, generator=gen).to(device)
    scores = make_scores((3, 24), 2, torch.float32, device, gen)
    scores[0, 5, 1] = bad  # piece 0
    scores[1, 21, 0] = bad  # piece 2
    scores[2, 8:16] = -INF  # an empty piece
    forward = kernels(backend, "attention").forward
    pieces = [forward(x[:, k : k + 8], scores[:, k : k + 8], None, None, None) for k in (0, 8, 16)]
    merged = combine_softmax(SoftmaxState(*(torch.stack(parts) for parts in zip(*pieces, strict=True))))
    expected = reference.attention_pool(x, scores)
    assert_close(merged.out, expected)
    assert merged.out[0, 4:].isnan().all() and merged.out[1, :4].isnan().all()
    assert merged.out[0, :4].isfinite().all() and merged.out[1, 4:].isfinite().all()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("num_heads", [1, 2])
def test_zero_hidden(num_heads, layout, backend, device):
    """H = 0: (B, 0) outputs and a backward that runs (the default scale 1/sqrt(H/nh) has no
    channel to scale)."""
    gen = make_generator(5)
    if layout == "padded":
        x, kwargs, tokens = torch.randn(3, 5, 0).to(device), {}, (3, 5)
    else:
        kwargs = dict(cu_seqlens=cu_seqlens_of([2, 0, 3], device=device))
        x, tokens = torch.randn(5, 0).to(device), (5,)
    query = torch.randn(num_heads, 0).to(device) if num_heads > 1 else torch.randn(0).to(device)
    scores = make_scores(tokens, num_heads, torch.float32, device, gen)
    for op, other in (("query_attention_pool", query), ("attention_pool", scores)):
        out, grads = check_attention(op, backend, x, other, **kwargs)
        assert out.shape == (3, 0) and not grads[1].any()
    out = fused_pool.query_attention_pool(x, query, **kwargs, scale=2.0, backend=backend)
    assert out.shape == (3, 0)
