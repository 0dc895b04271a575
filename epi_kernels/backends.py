"""Which implementation runs a step: the names users pass as ``backend=`` and how "auto" resolves.

"torch" is the eager pure-PyTorch reference; "compiled" is the same step fused into one loop by
torch.compile (opt-in: the first step pays the compile time). "triton" and "cuda" are reserved names
that raise a clear error until their kernels land. Nothing here imports Triton or an extension.
"""
from __future__ import annotations

__all__ = ["BACKENDS", "available_backends", "check_backend", "resolve_backend"]

BACKENDS = ("auto", "torch", "compiled", "triton", "cuda")


def available_backends() -> tuple[str, ...]:
    """Concrete backends usable in this installation."""
    return ("torch", "compiled")


def check_backend(name: object) -> None:
    """Raise ValueError unless `name` is a backend this installation can run."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    if name != "auto" and name not in available_backends():
        raise ValueError(
            f"Invalid backend: {name!r} is not available in this installation "
            f"(available: auto, {', '.join(available_backends())})"
        )


def resolve_backend(name: str) -> str:
    """The concrete backend for `name`: "auto" picks cuda > triton > torch by availability
    (never "compiled", whose first step compiles for tens of seconds: ask for it by name)."""
    if name == "auto":
        return "torch"
    return name
