"""GradScaler: EPIAdamW takes the scaler's scale and overflow flag (grad_scale / found_inf, as torch's
fused Adam does); an overflow skips the whole step: no score, moment, step counter or mask change."""
import copy

import pytest
import torch

from epi_kernels import EPIAdamW
from support.devices import CPU_KERNEL_BACKENDS, KERNEL_BACKENDS

EPI = dict(lr=0.05, isolation_ratio=0.25, refresh_interval=2, importance_beta=0.5)
BACKENDS = ["torch", *CPU_KERNEL_BACKENDS]


def _snapshot(params, opt):
    return copy.deepcopy([p.detach() for p in params]), copy.deepcopy(opt.state_dict())


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]  # epi_step included
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][key]) or (value.isnan().all() and sb["state"][i][key].isnan().all()), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_the_whole_step_and_grad_scale_unscales(backend):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, generator=g)), torch.nn.Parameter(torch.randn(3, 5, generator=g))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = EPIAdamW(params, backend=backend, **EPI), EPIAdamW(twin, backend=backend, **EPI)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, gr in zip(params, twin, grads):
            p.grad, q.grad = gr * 1024, gr.clone()  # scaled by a power of two: unscaling is exact
        before = _snapshot(params, opt)
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor([1.0])
        opt.step()  # overflow: nothing at all may change
        _same(before, _snapshot(params, opt))
        opt.found_inf = torch.tensor([0.0])
        opt.step()
        del opt.grad_scale, opt.found_inf
        ref.step()
        _same(_snapshot(twin, ref), _snapshot(params, opt))
    assert opt.param_groups[0]["epi_step"] == 5 and any(opt.isolation_mask(p).any() for p in params)


# (backend, device, capturable): capturable kernel steps read found_inf on the device, never on the host
SCALER_CASES = [pytest.param(("torch", "cpu", False), id="torch-cpu")] + [
    pytest.param((*p.values[0], capturable), id=f"{p.id}{'-capturable' if capturable else ''}", marks=p.marks)
    for p in KERNEL_BACKENDS for capturable in (False, True)]


@pytest.mark.parametrize("case", SCALER_CASES)
def test_with_a_real_grad_scaler(case):
    backend, device, capturable = case
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    twin = copy.deepcopy(model)
    kw = dict(EPI, backend=backend, capturable=capturable)
    opt, ref = EPIAdamW(model.parameters(), **kw), EPIAdamW(twin.parameters(), **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    skipped = 0
    for step in range(6):
        x = torch.randn(16, 8).to(device)
        if step == 3:
            x[0, 0] = float("inf")  # this step overflows: the scaler must skip it entirely
        loss = model(x).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = _snapshot(list(model.parameters()), opt)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step == 3:
            skipped += 1
            _same(before, _snapshot(list(model.parameters()), opt))
            assert scaler.get_scale() < scale
            continue
        ref.zero_grad()
        twin(x).square().mean().backward()
        ref.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # scale 2^k: unscaled grads equal
    assert skipped == 1 and opt.param_groups[0]["epi_step"] == ref.param_groups[0]["epi_step"] == 5
