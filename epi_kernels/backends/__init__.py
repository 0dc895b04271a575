"""The backends, each registered by its own module (:mod:`.registry` says what a backend is).

"torch" is the eager pure-PyTorch reference; "compiled" is the same step fused into one loop by
torch.compile (opt-in: the first step pays the compile time); "triton" and "cuda" are the fused
one-pass kernels (CUDA tensors, or CPU tensors in Triton's interpreter and the extension's host
harness). Nothing here imports Triton or loads the extension.

To add a backend: a module here that builds a :class:`Backend` and calls :func:`register`, and
its name in the import line below (the registration order is the order names are listed in).
"""
from . import eager, compiled, triton, cuda  # noqa: F401 - each registers its backend
from .cuda import cuda_host_harness
from .registry import (AUTO, Backend, available_backends, checked_backend_name, get, names, register, resolve,
                       resolve_backend, unregister)
from .triton import triton_interpreted

__all__ = ["AUTO", "Backend", "available_backends", "checked_backend_name", "cuda_host_harness", "get", "names",
           "register", "resolve", "resolve_backend", "triton_interpreted", "unregister"]
