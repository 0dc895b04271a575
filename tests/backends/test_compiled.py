"""backend="compiled" (torch.compile'd loops, small tensors stepped a group per call) against the eager torch backend."""
import warnings

import pytest
import torch

import epi_kernels.backends.compiled as compiled
from epi_kernels import EPIAdamW
from epi_kernels.mask import threshold_mask
from epi_kernels import threshold as th
from epi_kernels.threshold import score_keys, window_bins

EPI = dict(lr=0.05, isolation_ratio=0.2, refresh_interval=2, importance_beta=0.5)


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(t.to(dtype)) for t in (
        torch.randn(1, generator=g), torch.randn(7, generator=g), torch.randn(65, generator=g),
        torch.randn(33, 31, generator=g), torch.randn(24, 10, generator=g).t(), torch.randn((), generator=g),
        torch.randn(0, generator=g))]


def _grads(params, step):
    # quarter-integers: squares and the EMA with beta 0.5 are exact, so both backends see the very
    # same scores and must pick the very same masks
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(-8, 9, p.shape, generator=g).to(p.dtype) / 4 for p in params]


def _run(backend, dtype, steps=5, **kw):
    params = _params(dtype)
    opt = EPIAdamW(params, backend=backend, **{**EPI, **kw})
    for t in range(steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype,kw", [
    (torch.float32, {}),
    (torch.float32, {"amsgrad": True, "maximize": True, "importance": "abs", "weight_decay": 0.3}),
    (torch.bfloat16, {}),
])
def test_compiled_matches_eager(dtype, kw):
    p_eager, o_eager = _run("torch", dtype, **kw)
    p_comp, o_comp = _run("compiled", dtype, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    isolated = 0
    for a, b in zip(p_eager, p_comp):
        assert torch.equal(o_eager.isolation_mask(a), o_comp.isolation_mask(b))
        isolated += int(o_comp.isolation_mask(b).sum())
        torch.testing.assert_close(b, a, **tol)
        sa, sb = o_eager.state[a], o_comp.state[b]
        for key in ("exp_avg", "exp_avg_sq", "importance", "step") + (("max_exp_avg_sq",) if kw else ()):
            torch.testing.assert_close(sb[key], sa[key], **tol, msg=key)
    assert isolated > 0


def test_size_specialised_kernels_match_eager(monkeypatch):
    monkeypatch.setattr(compiled, "STATIC_NUMEL", 64)  # the test tensors >= 64 get exact-size kernels
    monkeypatch.setattr(compiled, "EXACT_STEP_NUMEL", 64)
    for f in (compiled._step_kernel, compiled._group_kernel, compiled.COMPILED_REFRESH_OPS.keys,
              compiled.COMPILED_REFRESH_OPS.bins, compiled._score_words_kernel):
        monkeypatch.setattr(f, "compiled", {})
        monkeypatch.setattr(f, "sizes", set())
    p_eager, o_eager = _run("torch", torch.float32)
    p_comp, o_comp = _run("compiled", torch.float32)
    assert compiled._step_kernel.compiled.keys() == {False}  # the non-contiguous 10x24, alone
    assert compiled._group_kernel.compiled.keys() == {False, True}  # 7 elements; 65, 33x31, 1 and () exact
    for a, b in zip(p_eager, p_comp):
        assert torch.equal(o_eager.isolation_mask(a), o_comp.isolation_mask(b))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_groups_of_small_tensors_match_eager_and_compile_once_per_group_length(monkeypatch):
    # 11 small tensors in groups of 3 whose equal sizes form different patterns (a a b, b a b, a a a)
    monkeypatch.setattr(compiled, "GROUP_SIZE", 3)
    monkeypatch.setattr(compiled._group_kernel, "compiled", {})
    monkeypatch.setattr(compiled._group_kernel, "sizes", set())
    g = torch.Generator().manual_seed(3)
    shapes = [(7,), (7,), (9,), (9,), (7,), (9,), (5,), (5,), (5,), (40, 3), (11, 11)]

    def run(backend):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = EPIAdamW(params, backend=backend, lr=0.05, isolation_ratio=0.2, refresh_interval=2)
        for _ in range(4):
            for p in params:  # mixed magnitudes: every rounding counts
                p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 4, p.shape, generator=g)
            opt.step()
        return params, opt

    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    p_comp, o_comp = run("compiled")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    g.manual_seed(3)
    p_eager, o_eager = run("torch")
    isolated = 0
    for a, b in zip(p_eager, p_comp):
        assert torch.equal(o_eager.isolation_mask(a), o_comp.isolation_mask(b))
        isolated += int(o_comp.isolation_mask(b).sum())
        assert torch.equal(o_eager.state[a]["importance"], o_comp.state[b]["importance"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert isolated > 0
    # groups of 3, 3, 3 and 2 tensors: two graphs (no graph per pattern of equal sizes), plus
    # whatever the refresh functions compiled
    assert len(compiled._group_kernel.sizes) == 2
    assert graphs <= 2 + 4, graphs


def test_compiled_keeps_isolated_elements_bit_identical():
    params, opt = _run("compiled", torch.float32, steps=3)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(params, 3)):
        p.grad = g
    opt.step()  # step 4: a refresh; the new mask applies to this very step
    for p, b in zip(params, before):
        mask = opt.isolation_mask(p)
        assert torch.equal(p[mask], b[mask])
        assert (p[~mask] != b[~mask]).all()


def test_falls_back_to_uncompiled_with_a_warning_when_compiling_fails(monkeypatch):
    def broken(*args):
        raise torch._inductor.exc.InvalidCxxCompiler()

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    for f in (compiled._step_kernel, compiled._score_words_kernel, compiled.COMPILED_REFRESH_OPS.keys,
              compiled.COMPILED_REFRESH_OPS.bins):
        monkeypatch.setattr(f, "compiled", {})
        monkeypatch.setattr(f, "sizes", set())
    monkeypatch.setattr(compiled, "_broken", None)
    with pytest.warns(RuntimeWarning, match="running its steps uncompiled"):
        p_fallback, o_fallback = _run("compiled", torch.float32)
    p_eager, o_eager = _run("torch", torch.float32)
    for a, b in zip(p_eager, p_fallback):
        assert torch.equal(o_eager.isolation_mask(a), o_fallback.isolation_mask(b))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("compiled", torch.float32, steps=1)  # warned once per process only


def test_other_errors_are_not_swallowed(monkeypatch):
    def bad(*args):
        raise ValueError("a real bug")

    monkeypatch.setattr(compiled._step_kernel, "compiled", {False: bad, True: bad})
    monkeypatch.setattr(compiled, "_broken", None)
    with pytest.raises(ValueError, match="a real bug"):
        _run("compiled", torch.float32, steps=1)


def test_compiled_refresh_ops_give_the_eager_integers():
    g = torch.Generator().manual_seed(5)
    s = torch.cat([torch.randn(5000, generator=g).pow(2), torch.zeros(10), torch.tensor([float("nan"), 1e-40])])
    ops = compiled.COMPILED_REFRESH_OPS
    keys = score_keys(s)
    assert torch.equal(ops.keys(s), keys)
    for origin in (th.BIN_WIDTH, 0x3C000000):
        o = torch.tensor(origin, dtype=torch.int32)
        assert torch.equal(ops.bins(s, o), window_bins(keys, o))
    for n in (1, 63, 64, 5012):
        tau = torch.tensor(0x3F000000, dtype=torch.int32)
        assert torch.equal(ops.mask(s[:n], tau), threshold_mask(keys[:n], tau))
