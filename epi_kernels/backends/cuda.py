"""backend="cuda": the CUDA C++ kernels of the compiled extension ``epi_kernels._C``
(:mod:`epi_kernels.kernel_sets.cuda_kernels`) run by the kernel backends' host flow
(:mod:`epi_kernels.step_driver`), on CUDA tensors, or on CPU tensors in the extension's host
harness (``EPI_CUDA_HOST=1``, the tests). The extension is loaded when availability is first asked
(when a backend is resolved), never at package import."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

from ..step_driver import kernel_step
from .registry import KERNEL_PARAM_DTYPES, Backend, cuda_or_emulated, env_flag, register

__all__ = ["BACKEND", "cuda_host_harness"]


@functools.lru_cache(maxsize=None)
def _has_extension() -> bool:
    """Whether the CUDA extension was built into this installation and loads (not whether a GPU
    exists: the module links cudart statically and loads without a driver). One that is present
    but does not load (built for another Python, a newer glibc, a stale build) is reported once and
    treated as absent."""
    if importlib.util.find_spec("epi_kernels._C") is None:
        return False
    try:
        importlib.import_module("epi_kernels.kernel_sets.cuda_kernels")
    except ImportError as e:
        warnings.warn(f"epi_kernels._C is installed but does not load ({e}); backend='cuda' is unavailable",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def cuda_host_harness() -> bool:
    """True when backend="cuda" steps CPU tensors in the extension's host harness (tests)."""
    return env_flag("EPI_CUDA_HOST")


BACKEND = register(Backend("cuda", functools.partial(kernel_step, "cuda"), refreshes_in_step=True, param_dtypes=KERNEL_PARAM_DTYPES,
                           capturable_on_cpu=True, auto_rank=2, available=_has_extension,
                           install_hint="the CUDA extension was not built: reinstall with a CUDA toolchain, "
                                        "EPI_BUILD_CUDA=1",
                           device_error=cuda_or_emulated("cuda", "EPI_CUDA_HOST", "the extension's host harness")))
