"""epi_kernels: AdamW with Evolving Parameter Isolation (EPI) and its fused kernels.

Importing this package needs only PyTorch; Triton and the compiled CUDA extension are optional.
"""
from .backends import available_backends
from .optimizer import EPIAdamW

__all__ = ["EPIAdamW", "available_backends"]
__version__ = "0.1.0"
