"""Installs `fused_pool`, its Triton kernels (the top-level `triton_kernels/` folder, installed as
`fused_pool.triton_kernels`, never as a top-level `triton_kernels` module: that name belongs to the
Triton project's own kernel package) and the C++/CUDA extension `fused_pool._C` built from `csrc/`.

The extension always has the CPU kernels. It gets the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are both present; FUSED_POOL_CUDA=1 requires them, FUSED_POOL_CUDA=0 skips them.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" (A100, H100/H200, and PTX for newer GPUs).
"""

import glob
import os

from setuptools import find_packages, setup

FLAG = os.environ.get("FUSED_POOL_CUDA", "auto").strip().lower()


def _build_cuda() -> bool:
    if FLAG in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    missing = [
        what
        for what, ok in (("a CUDA build of torch", torch.version.cuda), ("a CUDA toolkit", CUDA_HOME))
        if not ok
    ]
    if FLAG in ("1", "true", "yes", "on") and missing:
        raise RuntimeError(f"FUSED_POOL_CUDA=1 but there is no {' and no '.join(missing)}")
    return not missing


def _extension():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fused_pool.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-fopenmp"]
    if _build_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        extension = CUDAExtension(
            "fused_pool._C",
            sources,
            define_macros=[("FUSED_POOL_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "fused_pool._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()

# Every package under fused_pool/ (nn, integrations, ...) plus the Triton kernels, which live in the
# top-level folder triton_kernels/ and install as fused_pool.triton_kernels only.
PACKAGES = find_packages(include=["fused_pool", "fused_pool.*"]) + ["fused_pool.triton_kernels"]

setup(
    packages=PACKAGES,
    package_dir={"fused_pool.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
