"""fused_pool.nn.LinearPool and fused_pool.nn.SpladeHead: LinearPool against fused_pool.reference and
nn.Linear (state_dict, initialization, shared parameters); SpladeHead on tiny random BERT, DistilBERT,
RoBERTa, XLM-R and ModernBERT masked language models against the unfused computation (the model's own
MLM logits, log(1 + relu), masked max / sum), outputs and gradients, padded and varlen."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close,
    cpu_kernel_backends,
    cu_seqlens_of,
    make_generator,
    make_mask,
    poison_padding,
)
from torch import nn

from fused_pool import reference
from fused_pool.nn import LinearPool, SpladeHead

LINEAR_BACKENDS = cpu_kernel_backends("linear")  # linear_pool's backends that run on CPU tensors here


# --- LinearPool ------------------------------------------------------------------------------------


def test_linear_pool_is_initialized_and_loads_like_linear():
    torch.manual_seed(3)
    linear = nn.Linear(24, 40)
    torch.manual_seed(3)
    pool = LinearPool(24, 40)
    assert torch.equal(pool.weight, linear.weight) and torch.equal(pool.bias, linear.bias)
    assert pool.state_dict().keys() == linear.state_dict().keys()
    other = nn.Linear(24, 40)
    pool.load_state_dict(other.state_dict())
    assert torch.equal(pool.weight, other.weight) and torch.equal(pool.bias, other.bias)
    unbiased = LinearPool(24, 40, bias=False)
    assert unbiased.bias is None
    unbiased.load_state_dict(nn.Linear(24, 40, bias=False).state_dict())
    assert LinearPool(3, 5, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize(
    "mode, activation",
    [("max", "log1p_relu"), ("sum", "log1p_relu"), ("mean", None), ("max", "gelu"), ("sum", "tanh")],
)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_pool_matches_reference(backend, mode, activation, layout, bias):
    gen = make_generator(11)
    pool = LinearPool(20, 33, bias=bias, mode=mode, activation=activation, backend=backend)
    if layout == "padded":
        mask = make_mask("bool", 4, 9, gen)
        x = poison_padding(torch.randn(4, 9, 20, generator=gen), mask)
        kwargs = {}
    else:
        mask = None
        x = torch.randn(1, 17, 20, generator=gen)  # (1, T, H), as a flattening collator gives it
        kwargs = dict(cu_seqlens=cu_seqlens_of([5, 0, 1, 11]), max_seqlen=11)
    grad = torch.randn(4, 33, generator=gen)
    leaf = x.clone().requires_grad_()
    out = pool(leaf, mask, **kwargs)
    grads = torch.autograd.grad(out, [leaf, *pool.parameters()], grad)
    exact_leaves = [t.detach().double().requires_grad_() for t in (x, *pool.parameters())]
    weight, bias64 = exact_leaves[1], exact_leaves[2] if bias else None
    exact = reference.linear_pool(
        exact_leaves[0], weight, bias64, mask, mode=mode, activation=activation, **kwargs
    )
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad.double())
    assert out.shape == (4, 33) and out.dtype == torch.float32
    assert_close(out, exact.float(), atol=1e-5, rtol=1e-5)
    kept = None if mask is None else mask[..., None]
    for actual, expected in zip(grads, exact_grads, strict=True):
        if actual.shape == x.shape and kept is not None:  # dx: 0 at padding (NaN there in the reference)
            assert torch.all(actual.masked_select(~kept) == 0)
            actual, expected = actual.masked_fill(~kept, 0), expected.masked_fill(~kept, 0)
        assert_close(actual, expected.float(), atol=1e-4, rtol=1e-4)


def test_from_linear_shares_the_parameters():
    linear = nn.Linear(8, 12)
    pool = LinearPool.from_linear(linear, mode="sum", activation="relu", backend="torch")
    assert pool.weight is linear.weight and pool.bias is linear.bias
    assert (pool.in_features, pool.out_features, pool.mode, pool.activation) == (8, 12, "sum", "relu")
    x = torch.randn(2, 5, 8)
    before = linear.weight.detach().clone()
    optimizer = torch.optim.SGD(pool.parameters(), lr=0.1)
    pool(x).sum().backward()
    optimizer.step()
    assert not torch.equal(linear.weight, before)  # training the pool trained the Linear
    expected = torch.relu(linear(x)).sum(1)
    assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)
    unbiased = LinearPool.from_linear(nn.Linear(8, 12, bias=False))
    assert unbiased.bias is None and unbiased.mode == "max" and unbiased.activation is None


def test_linear_pool_output_size_and_repr():
    pool = LinearPool(8, 12, mode="sum", activation="silu")
    assert pool.output_size(8) == 12 and not pool.takes_layers
    with pytest.raises(ValueError, match="in_features = 8"):
        pool.output_size(9)
    assert "mode='sum'" in repr(pool) and "activation='silu'" in repr(pool)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: LinearPool(8, 4, mode="avg"), ValueError, "mode must be one of"),
        (lambda: LinearPool(8, 4, mode=1), TypeError, "mode must be a str"),
        (lambda: LinearPool(8, 4, activation="softmax"), ValueError, "activation must be None or one of"),
        (lambda: LinearPool(8, 4, activation=torch.relu), TypeError, "activation must be a str"),
        (lambda: LinearPool(0, 4), ValueError, "in_features must be >= 1"),
        (lambda: LinearPool(8, 2.5), TypeError, "out_features must be an int"),
        (lambda: LinearPool(8, 4, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: LinearPool.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "linear must be a torch.nn.Linear"),
        (lambda: LinearPool.from_linear(nn.Linear(2, 2), mode="min"), ValueError, "mode must be one of"),
    ],
)
def test_linear_pool_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_linear_pool_forward_checks_the_input():
    pool = LinearPool(8, 4, backend="torch")
    with pytest.raises(ValueError, match="weight must be"):
        pool(torch.randn(2, 3, 7))


# --- SpladeHead on tiny masked language models -----------------------------------------------------

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta", "modernbert"]


def tiny_masked_lm(family: str, dtype=torch.float32) -> nn.Module:
    """A random *ForMaskedLM (every parameter random, so no LayerNorm or bias is trivially 1 or 0)."""
    transformers = pytest.importorskip("transformers")
    configs = {
        "bert": lambda: transformers.BertConfig(**TINY),
        "distilbert": lambda: transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=37
        ),
        "roberta": lambda: transformers.RobertaConfig(**TINY, pad_token_id=1),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**TINY, pad_token_id=1),
        "modernbert": lambda: transformers.ModernBertConfig(
            **TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
        ),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(configs[family]()).eval()
    gen = make_generator(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.to(dtype)


def unfused_logits(family: str, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head as each model's forward runs it (transformers 5.x source)."""
    if family == "bert":
        return model.cls(hidden)
    if family == "distilbert":
        transformed = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
        return model.vocab_projector(transformed)
    if family in ("roberta", "xlm-roberta"):
        return model.lm_head(hidden)
    return model.decoder(model.head(hidden))


def splade_activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    values = torch.log1p(torch.relu(logits))
    return torch.log1p(values) if activation == "log1p_log1p_relu" else values


def unfused_pool(values: torch.Tensor, keep: torch.Tensor, pooling: str) -> torch.Tensor:
    """Masked max / sum over (B, L, V) values >= 0 (an empty sequence gives 0)."""
    values = values.masked_fill(~keep[..., None], 0)
    return values.amax(1) if pooling == "max" else values.sum(1)


def padded_hidden(dtype, gen):
    keep = make_mask("bool", 4, 7, gen)  # an empty and a one-token sequence among them
    return torch.randn(4, 7, 32, generator=gen).to(dtype), keep


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "pooling, activation", [("max", "log1p_relu"), ("sum", "log1p_relu"), ("max", "log1p_log1p_relu")]
)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_splade_head_matches_unfused(backend, family, pooling, activation, layout, dtype):
    model = tiny_masked_lm(family, dtype)
    head = SpladeHead.from_masked_lm(model, pooling=pooling, activation=activation, backend=backend)
    gen = make_generator(5)
    if layout == "padded":
        hidden, keep = padded_hidden(dtype, gen)
        fused = lambda h: head(h, keep.long())
        exact = lambda h: unfused_pool(
            splade_activation(unfused_logits(family, model, h), activation), keep, pooling
        )
    else:
        lengths = [3, 0, 1, 6]
        hidden = torch.randn(1, sum(lengths), 32, generator=gen).to(dtype)  # (1, T, H)
        cu_seqlens = cu_seqlens_of(lengths)
        fused = lambda h: head(h, cu_seqlens=cu_seqlens, max_seqlen=6)

        def exact(h):
            values = splade_activation(unfused_logits(family, model, h[0]), activation)
            rows = [
                values[a:b] for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
            ]
            pick = (lambda v: v.amax(0)) if pooling == "max" else (lambda v: v.sum(0))
            return torch.stack([pick(v) if len(v) else v.new_zeros(v.shape[1]) for v in rows])

    params = list(head.parameters())
    grad = torch.randn(4, 100, generator=gen).to(dtype)
    tolerance = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    leaf = hidden.detach().requires_grad_()
    out = fused(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], grad)
    expected_out = exact(leaf)
    expected_grads = torch.autograd.grad(expected_out, [leaf, *params], grad)
    assert out.shape == (4, 100) and out.dtype == dtype
    assert_close(out, expected_out, **tolerance)
    for actual, expected in zip(grads, expected_grads, strict=True):
        assert_close(actual, expected, **tolerance)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_splade_head_on_the_base_model_equals_the_masked_lm(family, pooling):
    """SpladeHead(model.base_model(...)[0]) against the whole model's logits: output and the gradient of
    every parameter of the model (the tied embedding gets both its lookup's and the decoder's part)."""
    model = tiny_masked_lm(family, torch.float64)
    head = SpladeHead.from_masked_lm(model, pooling=pooling, backend="torch")
    gen = make_generator(2)
    ids = torch.randint(3, 100, (3, 6), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    params = list(model.parameters())
    grad = torch.randn(3, 100, generator=gen, dtype=torch.float64)
    out = head(model.base_model(input_ids=ids, attention_mask=mask)[0], mask)
    grads = torch.autograd.grad(out, params, grad, allow_unused=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = unfused_pool(splade_activation(logits, "log1p_relu"), mask.bool(), pooling)
    expected_grads = torch.autograd.grad(expected, params, grad, allow_unused=True)
    assert_close(out, expected, atol=1e-10, rtol=1e-10)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert (actual is None) == (wanted is None)
        if actual is not None:
            assert_close(actual, wanted, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_splade_head_holds_the_models_own_parameters(family):
    model = tiny_masked_lm(family)
    head = SpladeHead.from_masked_lm(model, backend="torch")
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in head.parameters())
    embeddings = model.get_input_embeddings().weight
    assert head.decoder is model.get_output_embeddings() and head.decoder.weight is embeddings
    if family not in ("distilbert", "modernbert"):  # their decoder bias is tied to lm_head / predictions
        owner = model.cls.predictions if family == "bert" else model.lm_head
        assert head.decoder.bias is owner.bias
    assert head.output_size(32) == 100 and not head.takes_layers
    before = embeddings.detach().clone()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    head(torch.randn(2, 5, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.get_input_embeddings().weight, before)  # the model was trained
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_splade_head_errors():
    transformers = pytest.importorskip("transformers")
    base = transformers.BertModel(transformers.BertConfig(**TINY))
    with pytest.raises(TypeError, match="model must be one of the masked language models"):
        SpladeHead.from_masked_lm(base)
    with pytest.raises(TypeError, match="model must be a Hugging Face"):
        SpladeHead.from_masked_lm("bert-base-uncased")
    bert = tiny_masked_lm("bert")
    with pytest.raises(ValueError, match="pooling must be one of"):
        SpladeHead.from_masked_lm(bert, pooling="avg")
    with pytest.raises(TypeError, match="pooling must be a str"):
        SpladeHead.from_masked_lm(bert, pooling=None)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        SpladeHead.from_masked_lm(bert, activation="softplus")
    with pytest.raises(TypeError, match="decoder must be a torch.nn.Linear"):
        SpladeHead(nn.Identity(), nn.Identity())
    with pytest.raises(TypeError, match="transform must be a torch.nn.Module"):
        SpladeHead(torch.relu, nn.Linear(4, 8))
    with pytest.raises(ValueError, match="decoder takes 32 channels"):
        SpladeHead.from_masked_lm(bert).output_size(16)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_modules_under_autocast_compute_as_linear_does(backend):
    """Mixed precision: a float32 module under torch.autocast runs in the autocast dtype, as nn.Linear."""
    gen = make_generator(8)
    pool = LinearPool(16, 24, mode="sum", activation="relu", backend=backend)
    head = SpladeHead(nn.LayerNorm(16), nn.Linear(16, 24), pooling="max", backend=backend)
    x, mask = torch.randn(3, 5, 16, generator=gen), make_mask("bool", 3, 5, gen)
    keep = mask[..., None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, head_out = pool(x, mask), head(x, mask)
        expected = torch.relu(nn.functional.linear(x, pool.weight, pool.bias)).masked_fill(~keep, 0).sum(1)
        logits = head.decoder(head.transform(x))
        expected_head = torch.log1p(torch.relu(logits)).masked_fill(~keep, 0).amax(1)
    assert out.dtype == head_out.dtype == torch.bfloat16
    assert_close(out, expected.to(torch.bfloat16), atol=0.05, rtol=0.02)
    assert_close(head_out, expected_head.to(torch.bfloat16), atol=0.02, rtol=0.02)
    out.float().sum().backward()
    assert pool.weight.grad.dtype == torch.float32  # the float32 parameters get their gradients
