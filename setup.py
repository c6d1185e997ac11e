"""Installs `fused_pool` and its Triton kernels (the top-level `triton_kernels/` folder) as
`fused_pool.triton_kernels`. Never as a top-level `triton_kernels` module: that name belongs to the
Triton project's own kernel package.
"""

from setuptools import setup

setup(
    packages=["fused_pool", "fused_pool.triton_kernels"],
    package_dir={"fused_pool": "fused_pool", "fused_pool.triton_kernels": "triton_kernels"},
)
