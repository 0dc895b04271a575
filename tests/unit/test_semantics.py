"""Hand-checked semantics of README "Semantics": which elements freeze, when, and what still updates.

Most cases use importance_beta=0, so the score at the start of a step is simply f(g) of the
previous step and the expected masks can be read off the gradients by eye.
"""
import functools
import sys

import pytest
import torch

import epi_kernels
from epi_kernels.schedule import is_refresh_step
from epi_kernels.threshold import score_keys
from support.devices import CPU_KERNEL_BACKENDS

EPIAdamW = epi_kernels.EPIAdamW


@pytest.fixture(autouse=True, params=["torch", *CPU_KERNEL_BACKENDS], ids=lambda b: f"backend={b}")
def backend(request, monkeypatch):
    """Every case runs on the reference backend and on the kernel backends (CPU tensors: Triton's
    interpreter, the CUDA extension's host harness)."""
    name = request.param
    monkeypatch.setattr(sys.modules[__name__], "EPIAdamW", functools.partial(epi_kernels.EPIAdamW, backend=name))
    return name

RAMP = torch.arange(1.0, 11.0)  # gradient i+1 for element i: elements 8 and 9 matter most
REVERSED = RAMP.flip(0)


def run(grads, p=None, **kw):
    """Step an optimizer over a list of gradients; record (before, after, mask) per step."""
    p = torch.nn.Parameter(torch.zeros(10) if p is None else p)
    kw = {"lr": 0.1, "isolation_ratio": 0.2, "refresh_interval": 2, "importance_beta": 0.0, **kw}
    opt = EPIAdamW([p], **kw)
    trace = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        trace.append((before, p.detach().clone(), opt.isolation_mask(p).clone()))
    return opt, p, trace


def frozen(before, after):
    return (before == after).nonzero().squeeze(1).tolist()


def test_schedule():
    assert [t for t in range(1, 13) if is_refresh_step(t, 3, None, False)] == [3, 6, 9, 12]
    assert [t for t in range(1, 13) if is_refresh_step(t, 3, 5, False)] == [5, 8, 11]
    assert [t for t in range(1, 13) if is_refresh_step(t, 3, 0, False)] == [3, 6, 9, 12]
    assert [t for t in range(1, 13) if is_refresh_step(t, 4, 1, True)] == [1]
    assert [t for t in range(1, 13) if is_refresh_step(t, 1, 2, False)] == list(range(2, 13))


def test_which_elements_freeze_and_when_they_are_released():
    # steps 1-3: RAMP, steps 4-6: REVERSED; refreshes at steps 2, 4, 6 (warmup = interval = 2)
    opt, p, trace = run([RAMP] * 3 + [REVERSED] * 3)
    assert frozen(*trace[0][:2]) == []  # before the first refresh nothing is isolated
    assert frozen(*trace[1][:2]) == [8, 9]  # step 2: top-2 of RAMP
    assert frozen(*trace[2][:2]) == [8, 9]  # mask constant between refreshes
    # step 4 refreshes from the scores at its start (RAMP of step 3): still 8, 9, although the
    # gradient of step 4 itself (REVERSED) would pick 0, 1 ("consistent lag")
    assert frozen(*trace[3][:2]) == [8, 9]
    assert frozen(*trace[4][:2]) == [8, 9]
    assert frozen(*trace[5][:2]) == [0, 1]  # step 6: 8 and 9 released, 0 and 1 isolated
    for before, after, mask in trace:
        assert mask.nonzero().squeeze(1).tolist() == frozen(before, after)
    stats = opt.isolation_stats()[0]
    assert (stats["k"], stats["selected"], stats["refresh_step"]) == (2, 2, 6)
    assert stats["overlap"] == 0.0  # {0, 1} vs {8, 9}


def test_static_refreshes_once():
    opt, p, trace = run([RAMP] * 3 + [REVERSED] * 5, static=True)
    assert all(frozen(b, a) == [8, 9] for b, a, _ in trace[1:])
    assert opt.isolation_stats()[0]["refresh_step"] == 2


def test_warmup_delays_the_first_refresh():
    _, _, trace = run([RAMP] * 6, refresh_interval=2, warmup_steps=5)
    assert [frozen(b, a) for b, a, _ in trace] == [[]] * 4 + [[8, 9]] * 2


def test_isolated_elements_skip_weight_decay_and_moments_still_update(backend):
    p0 = torch.linspace(1.0, 2.0, 10)
    opt, p, trace = run([RAMP] * 3, p=p0.clone(), weight_decay=0.5)
    ref = torch.nn.Parameter(p0.clone())
    adamw = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        ref.grad = RAMP.clone()
        adamw.step()
    after_step1 = trace[0][1]
    assert torch.equal(p[8:], after_step1[8:])  # bit-identical: no Adam update and no decay since step 2
    assert (p[:8] != after_step1[:8]).all()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        if backend == "torch":  # torch's own AdamW runs: the very same bits
            assert torch.equal(opt.state[p][key], adamw.state[ref][key]), key
        else:  # a kernel's fp32 math may round differently (torch's CPU lerp uses an FMA)
            torch.testing.assert_close(opt.state[p][key], adamw.state[ref][key], rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("importance,expected", [("sq", [2.0, 3.0, 3.5]), ("abs", [1.0, 1.5, 1.75])])
def test_score_ema_by_hand(importance, expected):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = EPIAdamW([p], importance_beta=0.5, importance=importance, isolation_ratio=0.0)
    for want in expected:
        p.grad = torch.tensor([2.0, -2.0, 0.0])
        opt.step()
        assert opt.state[p]["importance"].tolist() == [want, want, 0.0]


def test_refresh_uses_scores_at_the_start_of_the_step():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = EPIAdamW([p], isolation_ratio=0.05, refresh_interval=3)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 10):
        start = opt.state[p]["importance"].clone() if opt.state else None
        p.grad = torch.randn(1000, generator=g) * torch.rand(1000, generator=g)
        opt.step()
        if t % 3 == 0:
            tau = int(opt.state[p]["threshold_bits"])
            assert torch.equal(opt.isolation_mask(p), score_keys(start) >= tau)  # C1, exactly
            assert abs(int(opt.isolation_mask(p).sum()) - 50) <= 4


def test_global_scope_compares_mean_normalised_scores():
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = EPIAdamW([a, b], importance="abs", importance_beta=0.0, isolation_ratio=0.25,
                   refresh_interval=1, scope="global")
    # |g| / mean: a -> [.4, .8, 1.2, 1.6], b -> [.5, .5, .5, 2.5]; top 2 of 8: b[3], a[3]
    for _ in range(2):
        a.grad = torch.tensor([100.0, 200.0, 300.0, 400.0])
        b.grad = torch.tensor([1.0, 1.0, 1.0, 5.0])
        opt.step()
    assert opt.isolation_mask(a).tolist() == [False, False, False, True]
    assert opt.isolation_mask(b).tolist() == [False, False, False, True]
    per_tensor = EPIAdamW([a, b], importance="abs", importance_beta=0.0, isolation_ratio=0.25,
                          refresh_interval=1)
    for _ in range(2):
        a.grad = torch.tensor([100.0, 200.0, 300.0, 400.0])
        b.grad = torch.tensor([1.0, 1.0, 1.0, 5.0])
        per_tensor.step()
    assert per_tensor.isolation_mask(a).tolist() == [False, False, False, True]


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_threshold_modes_select_exactly_k_on_distinct_scores(mode):
    p = torch.nn.Parameter(torch.zeros(20, 50))
    opt = EPIAdamW([p], isolation_ratio=0.1, refresh_interval=1, threshold=mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        p.grad = torch.randn(20, 50, generator=g)
        opt.step()
    assert int(opt.isolation_mask(p).sum()) == 100


def test_ratio_zero_never_isolates():
    opt, p, trace = run([RAMP] * 5, isolation_ratio=0.0)
    assert all(frozen(b, a) == [] for b, a, _ in trace)
    assert not opt.isolation_mask(p).any()


def test_params_without_grad_odd_shapes_and_non_contiguous():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 8, generator=g)
    params = [torch.nn.Parameter(base.t()), torch.nn.Parameter(torch.tensor(1.5)),
              torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(5)),
              torch.nn.Parameter(torch.randn(3, generator=g))]
    assert not params[0].is_contiguous()
    opt = EPIAdamW(params, isolation_ratio=0.25, refresh_interval=2)
    untouched = params[4].detach().clone()
    for _ in range(4):
        for q in params[:4]:
            q.grad = torch.randn(q.shape, generator=g)
        start = opt.state[params[0]]["importance"].clone() if opt.state else None
        opt.step()
    assert torch.equal(params[4], untouched) and params[4] not in opt.state
    mask = opt.isolation_mask(params[0])
    assert mask.shape == (8, 6) and int(mask.sum()) == 12
    # mask bits follow logical order: compare with the same scores on a contiguous copy
    keys = score_keys(start).view(8, 6)
    assert torch.equal(mask, keys >= int(opt.state[params[0]]["threshold_bits"]))
    assert opt.isolation_mask(params[2]).shape == (0,)
    assert opt.isolation_mask(params[1]).shape == ()


def test_non_contiguous_isolated_elements_are_frozen_in_place():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(base.t())
    opt = EPIAdamW([p], isolation_ratio=0.25, refresh_interval=1, importance_beta=0.0)
    grad = torch.arange(48.0).view(8, 6) + 1  # logical order: larger later
    for _ in range(3):
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
    assert torch.equal((p == before), opt.isolation_mask(p))
    assert opt.isolation_mask(p).view(-1).nonzero().squeeze(1).tolist() == list(range(36, 48))


def test_non_finite_gradients_never_isolated_and_do_not_disturb_others():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = EPIAdamW([p], isolation_ratio=0.2, refresh_interval=2, importance_beta=0.0)
    g = RAMP.clone()
    g[9] = float("nan")
    g[8] = float("inf")
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
    s = opt.state[p]["importance"]
    assert torch.equal(s[:8], RAMP[:8] ** 2)  # other scores exact
    assert opt.isolation_mask(p).nonzero().squeeze(1).tolist() == [6, 7]  # top-2 finite
    assert opt.isolation_stats()[0]["selected"] == 2


def test_bf16_scores_and_bf16_params():
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = EPIAdamW([p], importance_dtype=torch.bfloat16, isolation_ratio=0.125, refresh_interval=1,
                   importance_beta=0.5)
    g = torch.randn(64, generator=torch.Generator().manual_seed(4)).bfloat16()
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    s = opt.state[p]["importance"]
    assert s.dtype == torch.bfloat16
    s1 = (0.5 * g.float() ** 2).bfloat16().float()  # stored in bf16 after step 1
    want = (0.5 * s1 + 0.5 * g.float() ** 2).bfloat16()  # fp32 math, one rounding per step
    assert torch.equal(s, want)
    assert int(opt.isolation_mask(p).sum()) >= 8


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned():
    p = torch.nn.Parameter(torch.ones(3))
    opt = EPIAdamW([p], isolation_ratio=0.0)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 3.0 and p.grad is not None and (p < 1).all()


def test_per_group_epi_settings():
    a = torch.nn.Parameter(torch.zeros(10))
    b = torch.nn.Parameter(torch.zeros(10))
    opt = EPIAdamW([{"params": [a]}, {"params": [b], "isolation_ratio": 0.5}], isolation_ratio=0.1,
                   refresh_interval=1, importance_beta=0.0)
    for _ in range(2):
        a.grad, b.grad = RAMP.clone(), RAMP.clone()
        opt.step()
    assert int(opt.isolation_mask(a).sum()) == 1 and int(opt.isolation_mask(b).sum()) == 5


def test_static_without_warmup_isolates_at_the_first_interval():
    # warmup_steps=0, interval 2: the documented rule's first refresh is step 2, and the only one
    _, _, trace = run([RAMP] * 3 + [REVERSED] * 3, static=True, warmup_steps=0)
    assert [frozen(b, a) for b, a, _ in trace] == [[]] + [[8, 9]] * 5
