"""The kernel sets the custom ops of :mod:`epi_kernels.ops` run, by name: "triton"
(:mod:`.triton_kernels`) and "cuda" (:mod:`.cuda_kernels`: the extension on CUDA tensors, its
host harness on CPU tensors). Each is a leaf module implementing :class:`epi_kernels.launch.Kernels`
and is imported by name on first use (importing Triton or loading the extension), never at
package import; nothing in a kernel set imports the layers above it.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil

import torch

__all__ = ["NAMES", "kernel_set"]

# kernel set `name` is the module `<name>_kernels` of this package: a new one is found by its file
NAMES = tuple(sorted(m.name[:-len("_kernels")] for m in pkgutil.iter_modules(__path__) if m.name.endswith("_kernels")))


def kernel_set(name: str, device: torch.device):
    """(the kernel set `name` for tensors on `device`, the context to launch in)."""
    if name not in NAMES:
        raise ValueError(f"epi_kernels ops: unknown kernel set {name!r} (expected one of {', '.join(NAMES)})")
    kernels = importlib.import_module(f"{__name__}.{name}_kernels").kernels_for(device)
    return kernels, torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
