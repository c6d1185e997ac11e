import os

import torch

# Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter. This must be
# set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
