"""One-line swap of sentence-transformers' Pooling for fused_pool's.

    from fused_pool.integrations.sentence_transformers import patch
    model = patch(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"))

`patch` replaces every sentence-transformers Pooling module of the model (nested ones included) by
fused_pool's Pooling with the same configuration, in place, and returns the model. With
sentence-transformers installed, fused_pool.nn.Pooling builds `FusedPooling` objects: its class with
sentence-transformers' Pooling as a second base, so the library's own isinstance checks
(set_pooling_include_prompt, INSTRUCTOR handling, on_model_ready) find it, whether it was put there by
`patch`, loaded, or built by hand. A patched model saves exactly like an unpatched one and loads with
or without fused_pool.

A SparseEncoder's masked language model followed by SpladePooling is fused too: its (B, L, vocab)
logits are never built (fused_pool.integrations.sparse_encoder).

`late_chunk(model, documents, chunk_spans)` embeds chunks of long documents with the whole
document's context (fused_pool.integrations.late_chunking).
"""

from __future__ import annotations

import sentence_transformers  # noqa: F401  (an ImportError here where it is not installed)
from torch import nn

from ..nn.sentence_pooling import Pooling, sentence_transformers_pooling, with_sentence_transformers_base
from .late_chunking import late_chunk
from .sparse_encoder import fuse_splade

__all__ = ["FusedPooling", "late_chunk", "patch"]

FusedPooling = with_sentence_transformers_base(Pooling)
"""fused_pool.nn.Pooling that is also an instance of sentence-transformers' Pooling: the class of every
`fused_pool.nn.Pooling(...)` here. Saved and pickled as Pooling."""

_SentenceTransformersPooling = sentence_transformers_pooling()


def patch(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replaces the model's sentence-transformers Pooling modules by fused_pool's and fuses its SPLADE
    heads (Transformer(fill-mask) + SpladePooling), in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _SentenceTransformersPooling) and not isinstance(child, Pooling):
                setattr(parent, name, Pooling(**child.get_config_dict(), backend=backend))
    fuse_splade(model, backend)
    return model
