"""One-line swap of sentence-transformers' Pooling for fused_pool's.

    from fused_pool.integrations.sentence_transformers import patch
    model = patch(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"))

`patch` replaces every Pooling module of the model (nested ones included) by a `FusedPooling` with
the same configuration, in place, and returns the model. FusedPooling is fused_pool.nn.Pooling
that is also an instance of sentence-transformers' Pooling, so the library's own isinstance
checks (set_pooling_include_prompt, INSTRUCTOR handling, on_model_ready) keep working. A patched
model saves exactly like an unpatched one and loads with or without fused_pool.
"""

from __future__ import annotations

from torch import nn

from ..nn.sentence_pooling import Pooling

try:  # sentence-transformers >= 5.4 moved the module; older versions keep the classic path
    from sentence_transformers.sentence_transformer.modules import Pooling as _SentenceTransformersPooling
except ImportError:
    from sentence_transformers.models import Pooling as _SentenceTransformersPooling

__all__ = ["FusedPooling", "patch"]


class FusedPooling(Pooling, _SentenceTransformersPooling):
    """fused_pool.nn.Pooling, also an instance of sentence-transformers' Pooling."""

    def __reduce__(self):
        # The class presents sentence-transformers' module path (below): pickle through this module.
        return _restore, (self.get_config_dict(), self.backend, self.training)


# Recorded in modules.json as sentence-transformers' own Pooling (see fused_pool.nn.sentence_pooling).
FusedPooling.__module__ = Pooling.__module__
FusedPooling.__name__ = FusedPooling.__qualname__ = "Pooling"


def _restore(config: dict, backend: str | None, training: bool) -> FusedPooling:
    module = FusedPooling(**config, backend=backend)
    module.train(training)
    return module


def patch(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replaces the model's sentence-transformers Pooling modules by FusedPooling, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _SentenceTransformersPooling) and not isinstance(child, FusedPooling):
                setattr(parent, name, FusedPooling(**child.get_config_dict(), backend=backend))
    return model
