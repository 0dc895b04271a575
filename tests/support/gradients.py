"""Gradients for the backend parity tests (tests/backends/test_kernel_backends.py,
test_score_parity.py): random fp32 values of mixed magnitudes, no exactly representable shortcut."""
import torch


def mixed_gradient(shape, g: torch.Generator) -> torch.Tensor:
    """Random fp32 values over about 8 decades (normal times 10**U(-4, 4)), a few exact zeros."""
    x = torch.randn(shape, generator=g) * 10.0 ** (8 * torch.rand(shape, generator=g) - 4)
    return torch.where(torch.rand(shape, generator=g) < 0.02, 0.0, x)
