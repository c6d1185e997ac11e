"""Triton kernels of fused_pool (installed as fused_pool.triton_kernels)."""
