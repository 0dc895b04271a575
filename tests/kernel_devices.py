"""Where the kernel backends' tests run: CPU tensors in Triton's interpreter (machines without a
GPU, set up by conftest.py) and CUDA tensors on a GPU. Each case that cannot run here is skipped
with its reason, never passed silently."""
import importlib.util

import pytest
import torch

from epi_kernels.backends import triton_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

TRITON_DEVICES = [
    pytest.param("cpu", id="cpu-interpreter", marks=pytest.mark.skipif(
        not (HAS_TRITON and triton_interpreted()),
        reason="Triton not installed or its interpreter not enabled (with a GPU the kernels run on it)")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not (HAS_TRITON and HAS_CUDA), reason="no CUDA device (or Triton not installed)")),
]
