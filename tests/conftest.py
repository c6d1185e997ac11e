"""Where the tests are, by op kind (fused_pool/specs.py) and by concern.

Behaviour of one op kind (every backend against fused_pool.reference, the reference's own
hand-computed semantics, the "torch" backend, the extension's ops called directly):
    pool (masked_mean, masked_max, masked_mean_max)    test_pool.py
    attention (attention_pool)                          test_attention.py, with the tests that run
                                                        both attention ops on the same inputs
    query_attention (query_attention_pool)              test_query_attention.py (wide query heads too)
    both attention kinds: non-finite scores, tokens,    test_attention_nonfinite.py
        scales; zero-width heads
    span (span_pool)                                    test_span.py
        its kernels called directly                     test_span_ext.py (C++), test_span_triton.py
        late chunking (sentence-transformers)           test_late_chunking.py
    probe_attention (probe_attention_pool)              test_probe_attention.py (with the fold of
                                                        key projections into probes)
        its C++ / CUDA kernels against the reference    test_probe_attention_ext.py
        its Triton kernels called directly              test_probe_attention_triton.py
    linear (linear_pool)                                test_linear_pool.py (argument checks, compile
                                                        and opcheck too)
        peak memory at the issue's size (subprocess)    test_linear_memory.py
        its kernels called directly                     test_linear_ext.py (C++), test_linear_triton.py
        LinearPool, SpladeHead on HF masked LMs         test_linear_modules.py
        SparseEncoder (SPLADE) swap                     test_sparse_encoder.py
    first_token / last_token                            test_tokens.py
Across the ops:
    argument checks (ValueError / TypeError naming      test_arguments.py (fused_pool.nn
        the argument; the extension's op checks)        constructors: test_nn.py)
    launch limits (grids, offsets past int32, chunk     test_launch_limits.py
        offsets, wide-head selection, SASS, scale dtype)
    strided / expanded cu_seqlens views, every op       test_cu_seqlens_views.py
    torch.compile, opcheck                              test_compile.py
    differential (Hypothesis, every op and backend)     test_differential.py
    double backward raises                              test_double_backward.py
    partial states (pool and softmax)                   test_partial_states.py
    fused_pool.distributed (gloo subprocess workers)    distributed/
    backend selection                                   test_backends.py
    padding-free helpers (unpad / pad)                  test_padding.py
    fused_pool.nn modules                               test_nn.py
    fused_pool.nn.MAPHead (against the Hugging Face     test_map_head.py
        SigLIP / SigLIP2 / AIMv2 heads)
    sentence-transformers, transformers integrations    test_sentence_transformers.py,
                                                        test_transformers.py
    import graph, installed package, gpu_run reports    test_import_graph.py, test_installed_package.py,
                                                        test_gpu_run.py
Shared helpers: helpers.py (inputs, tolerances, the attention check, extension marks),
transformers_models.py, sentence_transformers_suite.py; fixtures here.
"""

import os
import warnings

import numpy as np
import pytest
import torch

# Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter. This must be
# set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_like_compiled_triton() -> None:
    """Triton's interpreter converts float32 -> bfloat16 by dropping the low 16 bits, and float64 ->
    bfloat16 as if it were an integer conversion (1.5 -> bits 0x0001); compiled Triton rounds to
    nearest even (LLVM fptrunc). Kernels store bfloat16 results that way, so without this the
    interpreter is up to 1 ulp off what the GPU computes (float64: garbage). Patch those two
    conversions to round to nearest even (NaN stays NaN; float64 goes through float32, a double
    rounding that differs from the GPU's single one only on exact float32 ties)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or not hasattr(interpreter, "TensorHandle"):
        warnings.warn(
            "Triton's interpreter changed: float32 -> bfloat16 is not patched to round to nearest even",
            stacklevel=2,
        )
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar in (tl.float32, tl.float64) and dst_type.scalar == tl.bfloat16:
            single = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = single.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
            data = np.where(np.isnan(single), quiet_nan, rounded)
            return interpreter.TensorHandle(data, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _round_bf16_like_compiled_triton()


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Shrinks the widest single-tile query head so that small heads take the wide-head kernels
    (at sizes the interpreter runs quickly)."""
    from fused_pool.triton_kernels import wide_query

    monkeypatch.setattr(wide_query, "QUERY_MAX_BLOCK_D", 16)
    monkeypatch.setattr(wide_query, "WIDE_BLOCK_D", 16)
    monkeypatch.setattr(wide_query, "WIDE_BLOCK_R", 16)
