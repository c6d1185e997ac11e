import os
import warnings

import numpy as np
import torch

# Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter. This must be
# set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_like_compiled_triton() -> None:
    """Triton's interpreter converts float32 -> bfloat16 by dropping the low 16 bits; compiled
    Triton rounds to nearest even (LLVM fptrunc). Kernels store bfloat16 results that way, so
    without this the interpreter is up to 1 ulp off what the GPU computes. Patch that one
    conversion to round to nearest even (NaN stays NaN)."""
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
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
            data = np.where(np.isnan(src.data), quiet_nan, rounded)
            return interpreter.TensorHandle(data, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _round_bf16_like_compiled_triton()
