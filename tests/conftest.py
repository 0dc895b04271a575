"""Test session setup. Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
