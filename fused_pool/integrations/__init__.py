"""Integrations with other libraries (imported on demand: each needs its library installed).

- `fused_pool.integrations.sentence_transformers`: `patch(model)` swaps a SentenceTransformer's
  Pooling modules for fused_pool's.
- `fused_pool.integrations.transformers`: `PooledModel` (pooler_output for any Hugging Face model)
  and `PooledModelForSequenceClassification` (any backbone + fused pooling + a linear head; packed
  batches).
"""
