"""Test session setup. Without a GPU, the kernel backends run on CPU tensors: Triton kernels in
Triton's interpreter (TRITON_INTERPRET must be set before any kernel module is imported, so it is
set here, first) and the CUDA backend in its extension's host harness (EPI_CUDA_HOST)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EPI_CUDA_HOST", "1")
