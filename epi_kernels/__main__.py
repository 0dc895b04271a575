"""`python -m epi_kernels`: what this installation can run (for bug reports and setup checks):
versions, whether Triton's interpreter can run with them, the backends available, whether the CUDA
extension is built and loads, the GPUs seen, and which backend `backend="auto"` picks on them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from . import __version__
from .backends import available_backends, resolve
from .backends.cuda import cuda_version_text, driver_problem
from .backends.triton import interpreter_version_error


def _interpreter(triton: str) -> str:
    """Whether backend="triton" can run in Triton `triton`'s interpreter with the installed NumPy."""
    try:
        numpy = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return "needs NumPy, which is not installed"
    return interpreter_version_error(triton, numpy) or f"runs with NumPy {numpy}"


def report() -> list[str]:
    lines = [f"epi_kernels {__version__}, torch {torch.__version__}, python {platform.python_version()}"]
    triton = importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None
    lines.append(f"triton: {triton or 'not installed'}")
    if triton:
        lines.append(f"Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): {_interpreter(triton)}")
    if importlib.util.find_spec("epi_kernels._C") is None:
        lines.append("CUDA extension epi_kernels._C: not built (no nvcc at install time, or EPI_BUILD_CUDA=0)")
    else:
        try:
            from . import _C  # noqa: PLC0415 - optional
        except ImportError as e:
            lines.append(f"CUDA extension epi_kernels._C: present but does not load: {e}")
        else:
            try:
                devices = f"{_C.device_count()} CUDA device(s)"
            except RuntimeError as e:
                devices = str(e)
            runtime, driver = _C.cuda_versions()
            versions = (f"built with CUDA {cuda_version_text(runtime)}, driver "
                        f"{'CUDA ' + cuda_version_text(driver) if driver else 'not installed'}")
            lines.append(f"CUDA extension epi_kernels._C: {_C.__file__}; {versions}; {devices}")
            problem = driver_problem()
            if problem:
                lines.append(f"  it cannot run on this machine's GPUs: {problem}")
    lines.append(f"backends available: {', '.join(available_backends())}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, capability "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))}")
        lines.append(f'backend="auto" on CUDA tensors: {resolve("auto", torch.device("cuda")).name}')
    else:
        lines.append('no CUDA device visible to torch: backend="auto" is "torch"')
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
