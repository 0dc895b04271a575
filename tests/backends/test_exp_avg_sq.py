"""importance="exp_avg_sq": the score is AdamW's own second moment, so there is no score state.

Every backend must isolate exactly what the reference engine selects from the start-of-step
exp_avg_sq of its own run (the moments themselves equal torch's AdamW to rounding only, so masks
are compared within a run), keep no "importance" entry, round-trip through state_dict, and refuse
score settings that would have no effect and a score source changed mid-run or on load.
"""
import copy

import pytest
import torch

from epi_kernels import EPIAdamW
from epi_kernels.refresh import refresh_masks
from epi_kernels.state import init_epi_state
from support.devices import CPU_KERNEL_BACKENDS

BACKENDS = ["torch", "compiled"] + CPU_KERNEL_BACKENDS
SIZES = (1000, 37, 9000)  # a tensor over one CHUNK, an odd mask byte
EPI = dict(importance="exp_avg_sq", isolation_ratio=0.1, refresh_interval=3, warmup_steps=3, lr=1e-2)


def _params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)) for n in SIZES]


def _grads(params, t):
    # mixed magnitudes (eight decades) and exact zeros, so keys differ in every bit and some tie at 0
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        x = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-6, 2, p.shape, generator=g).float()
        p.grad = x.masked_fill_(torch.rand(p.shape, generator=g) < 0.05, 0.0).to(p.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}, {"dtype": torch.bfloat16}], ids=["fp32", "amsgrad", "bf16"])
def test_masks_are_the_reference_selection_of_the_start_of_step_exp_avg_sq(backend, kw):
    kw = dict(kw)
    params = _params(kw.pop("dtype", torch.float32))
    opt = EPIAdamW(params, backend=backend, **EPI, **kw)
    refreshes = 0
    for t in range(1, 11):  # refreshes at 3, 6, 9
        _grads(params, t)
        if t % 3 == 0:  # the reference: the same engine on this run's exp_avg_sq before the step
            ref = []
            for p in params:
                st = opt.state[p]
                r = {}
                init_epi_state(r, p, None)
                r["threshold_bits"].copy_(st["threshold_bits"])  # the window's anchor
                r["isolation_mask"].copy_(st["isolation_mask"])
                ref.append((r, st["exp_avg_sq"].clone()))
        opt.step()
        if t % 3 == 0:
            refreshes += 1
            states = [r for r, _ in ref]
            refresh_masks(states, scores=[v for _, v in ref], isolation_ratio=0.1, scope="tensor", threshold="approx")
            for p, r in zip(params, states):
                st = opt.state[p]
                assert torch.equal(st["isolation_mask"], r["isolation_mask"]), (backend, t, p.numel())
                for key in ("threshold_bits", "isolated_count", "isolation_k", "threshold_exact"):
                    assert torch.equal(st[key].cpu(), r[key].cpu()), key
                assert int(st["isolated_count"]) > 0 and "importance" not in st
    assert refreshes == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_elements_keep_their_bits_and_the_rest_is_adamw(backend):
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = EPIAdamW(params, backend=backend, **EPI)
    plain = EPIAdamW(twins, backend=backend, **{**EPI, "isolation_ratio": 0.0})  # AdamW
    for t in range(1, 5):
        _grads(params, t)
        _grads(twins, t)
        before = [p.detach().clone() for p in params]
        opt.step()
        plain.step()
    for p, q, b in zip(params, twins, before):
        m = opt.isolation_mask(p)
        assert m.any()
        assert torch.equal(p[m], b[m])  # isolated at step 4: not moved
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"], rtol=0, atol=0)


def test_ratio_zero_is_adamw_bit_for_bit():
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = EPIAdamW(params, backend="torch", **{**EPI, "isolation_ratio": 0.0}, foreach=False)
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for t in range(1, 6):
        _grads(params, t)
        _grads(twins, t)
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("backend", ["torch"] + CPU_KERNEL_BACKENDS)
def test_state_is_adamw_plus_the_mask_and_round_trips(backend):
    params = _params()
    opt = EPIAdamW(params, backend=backend, **EPI)
    for t in range(1, 5):
        _grads(params, t)
        opt.step()
    st = opt.state[params[2]]
    big = {k: v for k, v in st.items() if v.numel() > 1}
    assert sorted(big) == ["exp_avg", "exp_avg_sq", "isolation_mask"]  # no score tensor
    assert st["isolation_mask"].numel() * 8 - 9000 < 64  # one bit per element, padded to 64-bit words
    saved = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = EPIAdamW(clones, backend=backend, **EPI)
    resumed.load_state_dict(saved)
    for t in range(5, 9):  # a refresh at 6
        _grads(params, t)
        _grads(clones, t)
        opt.step()
        resumed.step()
    for p, q in zip(params, clones):
        assert torch.equal(p, q) and torch.equal(opt.isolation_mask(p), resumed.isolation_mask(q))


@pytest.mark.parametrize("name, value", [("importance_beta", 0.9), ("importance_beta", 0.99),
                                         ("importance_dtype", torch.bfloat16), ("importance_dtype", torch.float32)])
def test_score_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}: .*importance='exp_avg_sq'.*leave {name} None"):
        EPIAdamW(_params(), **EPI, **{name: value})


def test_a_group_in_this_mode_does_not_inherit_the_score_settings():
    a, b = _params()[:2]
    opt = EPIAdamW([a], importance_beta=0.9)  # own scores, beta 0.9
    opt.add_param_group({"params": [b], "importance": "exp_avg_sq"})
    assert opt.param_groups[1]["importance_beta"] is None and opt.param_groups[0]["importance_beta"] == 0.9
    with pytest.raises(ValueError, match="Invalid importance_beta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "importance": "exp_avg_sq",
                             "importance_beta": 0.5})


def test_the_score_source_cannot_change_mid_run():
    params = _params()
    opt = EPIAdamW(params, **EPI)
    for t in range(1, 3):
        _grads(params, t)
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    opt.param_groups[0].update(importance="sq", importance_beta=None, importance_dtype=None)
    with pytest.raises(RuntimeError, match="score source cannot change mid-run"):
        opt.step()
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(after["state"][pid][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_loading_state_of_the_other_score_source_is_refused():
    params = _params()
    opt = EPIAdamW(params, isolation_ratio=0.1)  # own scores
    _grads(params, 1)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0].update(importance="exp_avg_sq", importance_beta=None, importance_dtype=None)
    fresh = EPIAdamW(_params(), **EPI)
    with pytest.raises(ValueError, match="score source cannot change on load"):
        fresh.load_state_dict(saved)
    assert not fresh.state  # nothing loaded
