"""Backends are registered objects: a new one is a Backend and one register() call, and the
optimizer, the settings checks and `backend="auto"` follow the registry without naming it."""
import pytest
import torch

from epi_kernels import EPIAdamW, available_backends, backends
from epi_kernels.backends.eager import eager_step

CALLS = []


def counting_step(tensors, hyper, plan):
    CALLS.append(len(tensors.params))
    eager_step(tensors, hyper, plan)


@pytest.fixture
def counting_backend():
    backend = backends.register(backends.Backend("counting", counting_step, wants_isolated_indices=True))
    CALLS.clear()
    yield backend
    backends.unregister("counting")


def _run(backend: str, steps: int = 6):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40, 7) * 10 ** torch.randint(-3, 3, (40, 7)).float()),
          torch.nn.Parameter(torch.randn(300))]
    opt = EPIAdamW(ps, lr=1e-2, isolation_ratio=0.2, refresh_interval=2, warmup_steps=1, backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 10 ** torch.randint(-4, 2, p.shape, generator=g).float()
        opt.step()
    return [p.detach().clone() for p in ps], [opt.isolation_mask(p) for p in ps]


def test_a_registered_backend_is_selectable_and_steps(counting_backend):
    assert "counting" in available_backends() and "counting" in backends.names()
    params, masks = _run("counting")
    assert CALLS == [2] * 6  # one call per step over the group's two tensors
    ref_params, ref_masks = _run("torch")
    assert all(torch.equal(a, b) for a, b in zip(params + masks, ref_params + ref_masks))
    assert any(m.any() for m in masks)


def test_auto_never_picks_a_backend_without_a_rank(counting_backend):
    assert backends.resolve("auto", torch.device("cpu")).name == "torch"


def test_unknown_and_unavailable_backends_are_refused_by_name():
    with pytest.raises(ValueError, match="Invalid backend: 'counting' .expected one of auto, torch"):
        EPIAdamW([torch.nn.Parameter(torch.ones(3))], backend="counting")
    backends.register(backends.Backend("absent", counting_step, available=lambda: False, install_hint="pip install it"))
    try:
        with pytest.raises(ValueError, match=r"'absent' is not available in this installation \(pip install it\)"):
            EPIAdamW([torch.nn.Parameter(torch.ones(3))], backend="absent")
        assert "absent" not in available_backends()
    finally:
        backends.unregister("absent")


def test_a_name_registers_once(counting_backend):
    with pytest.raises(ValueError, match="'counting' is taken"):
        backends.register(backends.Backend("counting", counting_step))
    with pytest.raises(ValueError, match="'auto' is taken"):
        backends.register(backends.Backend("auto", counting_step))


def test_a_backend_that_cannot_step_a_device_fails_before_anything_changes():
    backends.register(backends.Backend("nowhere", counting_step, device_error=lambda d: f"nowhere: not on {d.type}"))
    try:
        p = torch.nn.Parameter(torch.ones(8))
        opt = EPIAdamW([p], backend="nowhere")
        p.grad = torch.ones(8)
        with pytest.raises(RuntimeError, match="nowhere: not on cpu"):
            opt.step()
        assert torch.equal(p, torch.ones(8)) and not opt.state and opt.param_groups[0]["epi_step"] == 0
    finally:
        backends.unregister("nowhere")
