"""A failed step() or load_state_dict() changes nothing (DESIGN.md, "Semantics" and "Checkpoints"):
property-based probes over all four backends. Each draws a bad input (a tensor, a setting or a
state entry no backend can take, or one this backend cannot), puts it where a step or load would
meet it late (after good tensors and groups), and checks that the call raises a clear error, that
the optimizer, parameters and gradients are bit-identical to before, and that it then steps on
exactly as a twin that never saw the bad input."""
import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW
from epi_kernels.backends import cuda_host_harness, triton_interpreted
from support.devices import HAS_EXTENSION, HAS_TRITON

KERNELS = [b for b, ok in (("triton", HAS_TRITON and triton_interpreted()),
                           ("cuda", HAS_EXTENSION and cuda_host_harness())) if ok]
BACKENDS = ["torch", "compiled", *KERNELS]
SIZES = ((40, 24), (17,))  # two groups: two tensors, then one
# every bad input on every backend, with data and positions drawn (few draws: the interpreter is slow)
PROBE = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])


def grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 10.0 ** (4 * torch.rand(n, generator=g) - 2) for sizes in SIZES for n in sizes]


@functools.lru_cache(maxsize=None)
def _prepared(backend: str, steps: int) -> tuple[EPIAdamW, list[torch.nn.Parameter]]:
    ps = [torch.nn.Parameter(torch.linspace(-1.0, 1.0, n)) for sizes in SIZES for n in sizes]
    opt = EPIAdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.01, isolation_ratio=0.2, refresh_interval=2,
                   backend=backend)
    for seed in range(1, steps + 1):
        step(opt, ps, seed)
    return opt, ps


def make(backend: str, steps: int = 2) -> tuple[EPIAdamW, list[torch.nn.Parameter]]:
    """A copy of an optimizer `steps` steps in (masks set at step 2), both groups stepped, and its
    params (made once per backend: the Triton interpreter is slow)."""
    return copy.deepcopy(_prepared(backend, steps))


def step(opt, ps, seed):
    for p, g in zip(ps, grads(seed)):
        p.grad = g
    opt.step()


def snapshot(opt, ps) -> list:
    """Everything a step or a load could change, as plain values and tensor copies."""
    state = {i: copy.deepcopy(opt.state[p]) for i, p in enumerate(ps) if p in opt.state}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [[p.detach().clone() for p in ps], [None if p.grad is None else p.grad.clone() for p in ps], state, groups,
            [len(g["params"]) for g in opt.param_groups], len(opt.state)]


def same(a, b, where="") -> None:
    """Bit-identical (values, dtypes, shapes, devices), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------ bad inputs to step()

def _extra_group(opt, tensor, grad):
    """A third group whose one tensor comes last in the step."""
    t = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point() or tensor.is_complex())
    opt.add_param_group({"params": [t]})
    t.grad = grad
    return t


STEP_INPUTS = {
    # name: (what it does to the optimizer, the backends that must refuse it: None = all)
    "float64 tensor": (lambda opt, ps: _extra_group(opt, torch.randn(9, dtype=torch.float64),
                                                     torch.randn(9, dtype=torch.float64)), KERNELS),
    "integer tensor": (lambda opt, ps: _extra_group(opt, torch.arange(9), torch.arange(9)), None),
    "complex tensor": (lambda opt, ps: _extra_group(opt, torch.randn(9, dtype=torch.complex64),
                                                     torch.randn(9, dtype=torch.complex64)), None),
    "meta tensor": (lambda opt, ps: _extra_group(opt, torch.empty(9, device="meta"), torch.empty(9, device="meta")), None),
    "sparse gradient": (lambda opt, ps: setattr(ps[-1], "grad", torch.randn(17).to_sparse()), None),
    "state on another device": (lambda opt, ps: opt.state[ps[-1]].update(exp_avg=opt.state[ps[-1]]["exp_avg"].to("meta")),
                                None),
    "refresh_interval 2**64": (lambda opt, ps: opt.param_groups[1].update(refresh_interval=2 ** 64), None),
    "warmup_steps -1": (lambda opt, ps: opt.param_groups[1].update(warmup_steps=-1), None),
    "isolation_ratio 1.5": (lambda opt, ps: opt.param_groups[1].update(isolation_ratio=1.5), None),
    "lr -1": (lambda opt, ps: opt.param_groups[1].update(lr=-1.0), None),
    "betas (1.0, 0.9)": (lambda opt, ps: opt.param_groups[1].update(betas=(1.0, 0.9)), None),
    "importance_dtype float16": (lambda opt, ps: opt.param_groups[1].update(importance_dtype=torch.float16), None),
    "threshold 'median'": (lambda opt, ps: opt.param_groups[1].update(threshold="median"), None),
    "backend 'nope'": (lambda opt, ps: opt.param_groups[1].update(backend="nope"), None),
    "capturable on the CPU": (lambda opt, ps: opt.param_groups[1].update(capturable=True), ["torch", "compiled"]),
    "importance switched": (lambda opt, ps: opt.param_groups[1].update(importance="exp_avg_sq", importance_beta=None,
                                                                       importance_dtype=None), None),
}


@pytest.mark.parametrize("backend, bad", [(b, bad) for bad, (_, refusers) in sorted(STEP_INPUTS.items())
                                           for b in BACKENDS if refusers is None or b in refusers])
@PROBE
@given(seed=st.integers(3, 10 ** 6))
def test_a_refused_step_changes_nothing(backend, bad, seed):
    make_bad = STEP_INPUTS[bad][0]
    opt, ps = make(backend)
    twin, twin_ps = make(backend)
    for p, g in zip(ps, grads(seed)):
        p.grad = g
    before = snapshot(opt, ps)
    groups_before = len(opt.param_groups)
    settings_before = [dict(g) for g in opt.param_groups]
    make_bad(opt, ps)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as refused:
        opt.step()
    assert str(refused.value), "the error says nothing"
    # undo the bad input the way a user would, then the optimizer must be the twin's
    del opt.param_groups[groups_before:]
    for g, kept in zip(opt.param_groups, settings_before):
        g.update(kept)
    if bad == "sparse gradient":
        ps[-1].grad = before[1][-1].clone()
    if bad == "state on another device":
        opt.state[ps[-1]]["exp_avg"] = before[2][len(ps) - 1]["exp_avg"].clone()
    same(snapshot(opt, ps), before, f"after the refused step ({bad})")
    step(opt, ps, seed)  # the refused step's gradients (step 3: the kernels collect for step 4)
    step(twin, twin_ps, seed)
    same(snapshot(opt, ps), snapshot(twin, twin_ps), f"the step after the refused one ({bad})")


# ------------------------------------------------------------------ bad state dicts


def _sd_state(sd, i):
    return sd["state"][i]


LOAD_INPUTS = {
    "moment of another shape": lambda sd, i: _sd_state(sd, i).update(exp_avg=torch.zeros(3)),
    "moment None": lambda sd, i: _sd_state(sd, i).update(exp_avg_sq=None),
    "moment missing": lambda sd, i: _sd_state(sd, i).pop("exp_avg"),
    "sparse moment": lambda sd, i: _sd_state(sd, i).update(exp_avg=_sd_state(sd, i)["exp_avg"].to_sparse()),
    "integer moment": lambda sd, i: _sd_state(sd, i).update(exp_avg=_sd_state(sd, i)["exp_avg"].long()),
    "negative second moment": lambda sd, i: _sd_state(sd, i)["exp_avg_sq"].neg_().sub_(1.0),
    "step missing": lambda sd, i: _sd_state(sd, i).pop("step"),
    "step negative": lambda sd, i: _sd_state(sd, i).update(step=torch.tensor(-3.0)),
    "step NaN": lambda sd, i: _sd_state(sd, i).update(step=torch.tensor(float("nan"))),
    "step of shape [1]": lambda sd, i: _sd_state(sd, i).update(step=torch.tensor([2.0])),
    "mask 2-D": lambda sd, i: _sd_state(sd, i).update(isolation_mask=_sd_state(sd, i)["isolation_mask"].view(1, -1)),
    "mask bool": lambda sd, i: _sd_state(sd, i).update(isolation_mask=_sd_state(sd, i)["isolation_mask"].bool()),
    "scores float16": lambda sd, i: _sd_state(sd, i).update(importance=_sd_state(sd, i)["importance"].half()),
    "scores negative": lambda sd, i: _sd_state(sd, i)["importance"].sub_(1.0),
    "scores sparse": lambda sd, i: _sd_state(sd, i).update(importance=_sd_state(sd, i)["importance"].to_sparse()),
    "count a vector": lambda sd, i: _sd_state(sd, i).update(isolated_count=torch.zeros(2, dtype=torch.int64)),
    "count negative": lambda sd, i: _sd_state(sd, i).update(isolated_count=torch.tensor(-1)),
    "EPI entry missing": lambda sd, i: _sd_state(sd, i).pop("threshold_bits"),
    "state not a dict": lambda sd, i: sd["state"].update({i: [1, 2]}),
    "meta moment": lambda sd, i: _sd_state(sd, i).update(exp_avg=torch.empty(_sd_state(sd, i)["exp_avg"].shape,
                                                                               device="meta")),
    "group setting invalid": lambda sd, i: sd["param_groups"][-1].update(isolation_ratio=2.0),
    "epi_step negative": lambda sd, i: sd["param_groups"][-1].update(epi_step=-1),
    "group of another size": lambda sd, i: sd["param_groups"][0]["params"].pop(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", sorted(LOAD_INPUTS))
@PROBE
@given(which=st.integers(0, 2), seed=st.integers(3, 10 ** 6))
def test_a_refused_load_changes_nothing(backend, bad, which, seed):
    opt, ps = make(backend)
    source, _ = make(backend, steps=3)  # (a checkpoint one step further than opt)
    sd = copy.deepcopy(source.state_dict())
    LOAD_INPUTS[bad](sd, which)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError) as refused:
        opt.load_state_dict(sd)
    assert str(refused.value), "the error says nothing"
    same(snapshot(opt, ps), before, f"after the refused load ({bad})")
    # and it steps on as if the load had never been tried
    twin, twin_ps = make(backend)
    step(opt, ps, seed)
    step(twin, twin_ps, seed)
    same(snapshot(opt, ps), snapshot(twin, twin_ps), f"the step after the refused load ({bad})")
