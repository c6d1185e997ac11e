"""What benchmarks/gpu_run.py records about the Python environment it tests, printed by the
interpreter under test (gpu_run.py itself imports no torch):

    python benchmarks/gpu_run_probe.py versions   # python, torch, triton, ... and the GPU
    python benchmarks/gpu_run_probe.py install    # where fused_pool and its extension come from

Run as a script from outside the source tree, `import fused_pool` finds the installed package (the
script's folder, benchmarks/, is the one added to sys.path). Whether that package works is checked
by tests/test_installed_package.py.
"""

from __future__ import annotations

import importlib
import platform
import sys

MODULES = ("torch", "triton", "numpy", "transformers", "sentence_transformers", "pytest", "xdist")


def versions() -> list[str]:
    lines = [f"python: {platform.python_version()} ({sys.executable})"]
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            lines.append(f"{name}: {getattr(module, '__version__', '?')}")
        except Exception as error:  # a broken install is reported, not fatal
            lines.append(f"{name}: missing ({type(error).__name__})")
    import torch

    lines.append(f"torch CUDA: {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        l2_mib = getattr(props, "L2_cache_size", 0) >> 20
        lines.append(
            f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory >> 30} GiB, L2 {l2_mib} MiB"
        )
    return lines


def install() -> list[str]:
    import fused_pool
    from fused_pool.backends import extension, extension_has_cuda

    ext = extension()
    return [
        f"fused_pool: {fused_pool.__file__}",
        f"fused_pool._C: {ext.__file__ if ext else 'not built'}; CUDA kernels: {extension_has_cuda()}",
        f"available_backends: {fused_pool.available_backends()}",
    ]


if __name__ == "__main__":
    commands = {"versions": versions, "install": install}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(commands)}}}")
    print("\n".join(commands[sys.argv[1]]()))
