"""Where the kernel backends' tests run: on machines without a GPU, CPU tensors in Triton's
interpreter and in the CUDA extension's host harness (both set up by conftest.py); CUDA tensors on
a GPU. Each case that cannot run here is skipped with its reason, never passed silently."""
import importlib.util

import pytest
import torch

from epi_kernels.backends import cuda_host_harness, triton_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_EXTENSION = importlib.util.find_spec("epi_kernels._C") is not None
HAS_CUDA = torch.cuda.is_available()

TRITON_DEVICES = [
    pytest.param("cpu", id="cpu-interpreter", marks=pytest.mark.skipif(
        not (HAS_TRITON and triton_interpreted()),
        reason="Triton not installed or its interpreter not enabled (with a GPU the kernels run on it)")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (HAS_TRITON and HAS_CUDA), reason="no CUDA device (or Triton not installed)")]),
]

NO_EXTENSION = "the CUDA extension epi_kernels._C is not built (no CUDA toolchain at install time, or EPI_BUILD_CUDA=0)"

# (backend, device) of every kernel backend
KERNEL_BACKENDS = [
    pytest.param(("triton", "cpu"), id="triton-cpu-interpreter", marks=TRITON_DEVICES[0].marks),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=TRITON_DEVICES[1].marks),
    pytest.param(("cuda", "cpu"), id="cuda-host-harness", marks=pytest.mark.skipif(
        not (HAS_EXTENSION and cuda_host_harness()),
        reason=NO_EXTENSION if not HAS_EXTENSION else "EPI_CUDA_HOST not set (with a GPU the kernels run on it)")),
    pytest.param(("cuda", "cuda"), id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (HAS_EXTENSION and HAS_CUDA), reason="no CUDA device" if HAS_EXTENSION else NO_EXTENSION)]),
]

# the kernel backends that step CPU tensors here (by name; for tests written for CPU tensors)
CPU_KERNEL_BACKENDS = [pytest.param(p.values[0][0], id=p.values[0][0], marks=p.marks)
                       for p in KERNEL_BACKENDS if p.values[0][1] == "cpu"]
