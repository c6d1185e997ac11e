"""Tiny Hugging Face models for tests/test_transformers.py: configs of random ELECTRA, DeBERTa-v2,
DistilBERT, ModernBERT and BERT backbones, padded and packed batches of random token ids, and what
each pooling mode computes, written out by hand. Imported only once transformers is known to be
installed."""

from __future__ import annotations

import torch
from helpers import make_generator
from transformers import (
    AutoModel,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
)

from fused_pool.integrations.transformers import DataCollatorWithFlatteningForSequenceClassification

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


TINY_CONFIGS = {
    "electra": lambda: ElectraConfig(embedding_size=16, **TINY),
    "deberta-v2": lambda: DebertaV2Config(**TINY),
    "distilbert": lambda: DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37),
    "modernbert": lambda: ModernBertConfig(
        **{**TINY, "num_hidden_layers": 3},
        local_attention=4,  # a sliding window shorter than the sequences
        global_attn_every_n_layers=2,
        cls_token_id=1,
        sep_token_id=2,
        **SPECIAL_TOKENS,
    ),
    "bert": lambda: BertConfig(**TINY),
}


def tiny_backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModel.from_config(TINY_CONFIGS[name]()).eval()


def padded_batch(lengths=(5, 1, 9, 3), seed=0):
    """Random token ids, right-padded: (input_ids, attention_mask, the sequences)."""
    gen = make_generator(seed)
    sequences = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return ids, mask, sequences


def packed_batch(sequences, labels=None, **collator_kwargs):
    collator = DataCollatorWithFlatteningForSequenceClassification(**collator_kwargs)
    features = [{"input_ids": seq.tolist()} for seq in sequences]
    if labels is not None:
        for feature, label in zip(features, labels, strict=True):
            feature["labels"] = label
    return collator(features)


# --- hand computations ---------------------------------------------------------------------------


def hand_mean(h, mask, weights=None):
    w = mask.float() if weights is None else weights
    return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)


def hand_max(h, mask):
    return h.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)


def hand_token(h, mask, which):
    lengths = mask.sum(1)
    position = torch.zeros_like(lengths) if which == "first" else lengths - 1  # right padding
    return h[torch.arange(h.shape[0]), position]


def hand_pool(mode, pooler, layers, mask):
    """What each pooling mode computes, written out (right-padded batches with no empty sequence)."""
    h = layers[-1]
    if mode == "mean":
        return hand_mean(h, mask)
    if mode == "max":
        return hand_max(h, mask)
    if mode == "mean_max":
        return torch.cat([hand_mean(h, mask), hand_max(h, mask)], -1)
    if mode == "cls":
        return hand_token(h, mask, "first")
    if mode == "last":
        return hand_token(h, mask, "last")
    if mode == "weightedmean":
        positions = torch.arange(1, h.shape[1] + 1, dtype=torch.float32)
        return hand_mean(h, mask, mask * positions)
    if mode == "attention":
        scores = (h @ pooler.query.reshape(-1)) / h.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask.bool(), float("-inf")).softmax(1)
        return (weights[..., None] * h).sum(1)
    if mode == "weighted_layer":
        used = layers[pooler.layer_start :]
        weights = pooler.layer_weights / pooler.layer_weights.sum()
        return sum(w * hand_mean(layer, mask) for w, layer in zip(weights, used, strict=True))
    if mode == "concat_layers":
        return torch.cat([hand_mean(layers[-i], mask) for i in range(1, pooler.num_layers + 1)], -1)
    if mode == "lstm":
        rows = torch.stack([hand_token(layer, mask, "first") for layer in layers[1:]], 1)
        return pooler.lstm(rows)[0][:, -1]
    if mode == "dense":
        return torch.tanh(pooler.dense(hand_token(h, mask, "first")))
    raise ValueError(mode)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Fresh random values for every parameter (zero-initialized queries would hide mistakes)."""
    gen = make_generator(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
