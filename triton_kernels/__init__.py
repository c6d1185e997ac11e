"""Triton kernels of fused_pool (installed as fused_pool.triton_kernels).

One module per op kind holds its public functions, in the kind's spec signatures
(fused_pool.specs), and their launchers; the kernels sit beside it:

- pool.py: `pool_fwd`, `pool_bwd` (masked mean / max / mean_max); kernels in pool_kernels.py.
- attention.py: `attention_fwd`, `attention_bwd`, `query_attention_fwd`, `query_attention_bwd`;
  kernels in attention_kernels.py, wide query heads in wide_query.py, softmax pieces in softmax.py.
- span.py: `span_fwd`, `span_bwd` (span_pool); kernels in span_kernels.py.
- probe.py: `probe_attention_fwd`, `probe_attention_bwd` (probe_attention_pool); kernels in
  probe_kernels.py (the split combine is attention's).
- linear.py: `linear_fwd`, `linear_bwd` (linear_pool); kernels in linear_kernels.py.

Shared by all: split_plan.py (where each sequence's rows are and how long sequences are split over
programs) and launch.py (what a launcher does around a launch: device, argument views, options). The
reducing kernels (pool, span, linear) share reduction.py: the rows' weights, the running max and the
stores of their states.
"""
