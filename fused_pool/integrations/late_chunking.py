"""Late chunking for sentence-transformers models: encode a document once, then mean-pool the tokens
of each chunk (Jina AI, 2024), so that every chunk's vector carries the whole document's context.

    from fused_pool.integrations.sentence_transformers import late_chunk
    vectors = late_chunk(model, documents, chunk_spans)  # one (n_chunks, D) tensor per document

How a document becomes token embeddings:
- It is tokenized without special tokens; token i belongs to chunk [start, end) (character offsets)
  when its character start offset lies in [start, end). Special tokens belong to no chunk.
- Documents whose tokens fit the model's `max_seq_length` (with the tokenizer's special tokens) are
  encoded in one window. Longer ones are cut into windows of at most that many tokens, consecutive
  windows sharing `window_overlap` tokens. A token that two windows share takes its embedding from
  the first window while it lies in the first half of the shared stretch, and from the second window
  after that: each token comes from the window where it has the most context on both sides.
- Windows of every document are batched (`batch_size` windows per forward of the modules before the
  Pooling). The tokens' embeddings, in document order, then go through one `fused_pool.span_pool`
  call for every chunk of every document, and the pooled vectors through the modules after the
  Pooling (Dense, Normalize), as a sentence's would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional import span_pool
from ..nn.sentence_pooling import sentence_transformers_pooling

__all__ = ["late_chunk"]


def _split_at_pooling(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the modules before the model's Pooling, the modules after it)."""
    stock = sentence_transformers_pooling()
    modules = list(model.children())
    for index, module in enumerate(modules):
        if stock is not None and isinstance(module, stock):
            return modules[:index], modules[index + 1 :]
    raise ValueError("model must be a SentenceTransformer with a Pooling module (found none)")


def _windows(num_tokens: int, width: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(first, end, owned_first, owned_end) content-token ranges of each window: the window holds
    tokens [first, end) and gives the embeddings of [owned_first, owned_end)."""
    if num_tokens <= width:
        return [(0, num_tokens, 0, num_tokens)]
    step = width - overlap
    starts = list(range(0, num_tokens - overlap, step))
    if starts[-1] + width < num_tokens:
        starts.append(num_tokens - width)
    windows = []
    for k, first in enumerate(starts):
        end = min(first + width, num_tokens)
        owned_first = 0 if k == 0 else windows[-1][3]
        owned_end = num_tokens if k == len(starts) - 1 else (starts[k + 1] + end) // 2
        windows.append((first, end, owned_first, owned_end))
    return windows


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text ([CLS] / [SEP] for
    BERT, <s> / </s> for RoBERTa), read off one encoding with and one without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("the model's tokenizer does not keep a text's tokens when it adds special tokens")


def _chunk_token_spans(offsets: Tensor, chunks: Sequence[tuple[int, int]]) -> Tensor:
    """(n_chunks, 2) token spans [first, end): the tokens whose character start lies in each chunk."""
    starts = offsets[:, 0].contiguous()
    bounds = torch.tensor([list(chunk) for chunk in chunks], dtype=starts.dtype).reshape(-1, 2)
    return torch.searchsorted(starts, bounds, right=False)


@torch.no_grad()
def late_chunk(
    model: nn.Module,
    documents: Sequence[str],
    chunk_spans: Sequence[Sequence[tuple[int, int]]],
    *,
    batch_size: int = 8,
    window_overlap: int = 64,
) -> list[Tensor]:
    """One (n_chunks, D) tensor per document: the late-chunked embeddings of its chunks.

    chunk_spans[i] lists character spans [start, end) of documents[i] (they may overlap or leave
    gaps). A chunk with no token gives the modules after Pooling a zero vector. `window_overlap`
    tokens are shared by consecutive windows of a document longer than the model's max_seq_length.
    """
    if len(documents) != len(chunk_spans):
        raise ValueError(
            f"chunk_spans must give one list of spans per document: {len(chunk_spans)} lists for "
            f"{len(documents)} documents"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tokenizer = model.tokenizer
    width = model.max_seq_length - tokenizer.num_special_tokens_to_add()
    if not isinstance(window_overlap, int) or not 0 <= window_overlap < width:
        raise ValueError(f"window_overlap must be an int in [0, {width}), got {window_overlap!r}")
    before, after = _split_at_pooling(model)
    if not documents:
        return []
    encoded = tokenizer(
        list(documents), add_special_tokens=False, return_offsets_mapping=True, truncation=False
    )

    # Every window of every document, and where each content token's embedding comes from.
    window_ids: list[list[int]] = []
    sources: list[tuple[int, int]] = []  # (window, position in the window) of each content token
    prefix, suffix = _special_tokens_around(tokenizer)
    for ids in encoded["input_ids"]:
        for first, end, owned_first, owned_end in _windows(len(ids), width, window_overlap):
            window = len(window_ids)
            window_ids.append(prefix + ids[first:end] + suffix)
            sources += [(window, len(prefix) + t - first) for t in range(owned_first, owned_end)]

    device = next(model.parameters()).device
    embeddings, window_row = [], []  # window_row[w]: the first row of window w in cat(embeddings)
    for b in range(0, len(window_ids), batch_size):
        batch = tokenizer.pad({"input_ids": window_ids[b : b + batch_size]}, return_tensors="pt")
        features = {name: value.to(device) for name, value in batch.items()}
        for module in before:
            features = module(features)
        token_embeddings = features["token_embeddings"]  # (windows, padded length, H)
        base = sum(e.shape[0] for e in embeddings)
        window_row += [base + k * token_embeddings.shape[1] for k in range(token_embeddings.shape[0])]
        embeddings.append(token_embeddings.flatten(0, 1))
    rows = torch.tensor([window_row[w] + p for w, p in sources], dtype=torch.long, device=device)
    hidden = embeddings[0].shape[-1] if embeddings else model.get_sentence_embedding_dimension()
    tokens = torch.cat(embeddings)[rows] if embeddings else torch.zeros(0, hidden, device=device)

    # One span_pool call for the chunks of every document (token spans shifted to the document).
    spans, counts, token_start = [], [], 0
    for offsets, chunks in zip(encoded["offset_mapping"], chunk_spans, strict=True):
        spans.append(_chunk_token_spans(torch.tensor(offsets).reshape(-1, 2), chunks) + token_start)
        counts.append(len(chunks))
        token_start += len(offsets)
    pooled = span_pool(tokens, torch.cat(spans).to(device), mode="mean")
    features = {"sentence_embedding": pooled}
    for module in after:
        features = module(features)
    return list(features["sentence_embedding"].split(counts))
