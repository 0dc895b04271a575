"""Test session setup. Without a GPU, the kernel backends run on CPU tensors: Triton kernels in
Triton's interpreter (TRITON_INTERPRET must be set before any kernel module is imported, so it is
set here, first) and the CUDA backend in its extension's host harness (EPI_CUDA_HOST)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EPI_CUDA_HOST", "1")

from support import build  # noqa: E402 (after the environment above)


@pytest.fixture(scope="session")
def release_wheel(tmp_path_factory):
    """The release wheel (.ci/build-wheel), built once per session (or EPI_RELEASE_WHEEL)."""
    return build.release_wheel(tmp_path_factory.mktemp("release-wheel"))
