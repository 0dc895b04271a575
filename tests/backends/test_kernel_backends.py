"""The kernel backends, "triton" and "cuda" (fused step, window histogram, select and repair
kernels), against the pure-PyTorch reference.

Without a GPU they run on CPU tensors: Triton's kernels in its interpreter, the CUDA backend in its
extension's host harness (the kernels' own element and threshold functions, block after block;
conftest.py); with a GPU, on CUDA. Gradients are random fp32 values of mixed magnitudes (no
exactly representable shortcut): every backend rounds the score EMA in the same order (C7), so all
hold the very same scores and must pick the very same masks; every refresh is also checked on the
kernel optimizer's own start-of-step scores against the reference engine (C1, C2, C5), whatever the
dtypes.
"""
import copy

import pytest
import torch

from epi_kernels import EPIAdamW
from epi_kernels import threshold as th
from epi_kernels import backends
from epi_kernels.backends import resolve_backend
from epi_kernels.mask import threshold_mask, unpack_mask
from bench.thresholds import window_thresholds
from support.devices import HAS_EXTENSION, KERNEL_BACKENDS
from support.gradients import mixed_gradient
from support.score_inputs import DISTS, adversarial, gen, kth_largest, tie_inputs

pytestmark = pytest.mark.parametrize("kernel", KERNEL_BACKENDS)

EPI = dict(lr=0.05, isolation_ratio=0.2, refresh_interval=2, importance_beta=0.5)
STATS = ("threshold_bits", "isolation_k", "isolated_count", "isolation_overlap", "threshold_exact", "refresh_step")


def _params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (1023,), (4097,), (33, 31), (), (0,), (130, 70)]
    tensors = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(24, 10, generator=g).t()]
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in tensors]  # last: non-contiguous
    # contiguous but 2 or 4 bytes off a 16-byte boundary: the kernels' scalar (unvectorised) path
    return params + [torch.nn.Parameter(torch.randn(4099, generator=g).to(device=device, dtype=dtype)[1:])]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    # with the param's strides, as autograd makes them (torch's fused CPU AdamW assumes it)
    return [torch.empty_like(p).copy_(mixed_gradient(p.shape, g)) for p in params]


def _check_refresh(opt, params, start, anchors, before):
    """C1/C2 on the optimizer's own state, and isolated elements bit-identical through the step."""
    for p, s, anchor, b in zip(params, start, anchors, before):
        st = opt.state.get(p, {})
        mask = opt.isolation_mask(p)
        assert torch.equal(p.detach()[mask], b[mask])  # frozen: not a bit changed
        if s is None or int(st["refresh_step"]) != opt.param_groups[0]["epi_step"]:
            continue
        keys = th.score_keys(s.cpu())
        k = th.isolation_k(opt.param_groups[0]["isolation_ratio"], keys.numel())
        tau, repaired = th.approx_threshold([keys], k, anchor)
        cut = th.tie_cut(keys, tau, k) if repaired else th.TIE_NONE
        assert (int(st["threshold_bits"]), bool(st["threshold_exact"])) == (tau, repaired)
        assert torch.equal(mask.cpu().reshape(-1), unpack_mask(threshold_mask(keys, tau, cut), keys.numel()))
        assert int(st["isolated_count"]) == int(mask.sum())


def _run(backend, device, dtype, steps=6, skip=None, spike=None, **kw):
    params = _params(dtype, device)
    opt = EPIAdamW(params, backend=backend, **{**EPI, **kw})
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(params, t))):
            if spike is not None and t == spike:  # every 10th gradient x8: its score jumps x64
                every_10th = torch.arange(g.numel(), device=g.device).view(g.shape) % 10 == 0
                g.mul_(torch.where(every_10th, 8.0, 1.0).to(g.dtype))
            p.grad = None if skip and skip(t, i) else g
        st = [opt.state.get(p, {}) for p in params]
        start = [s["importance"].clone() if s else None for s in st]
        anchors = [int(s["threshold_bits"]) if s else th.KEY_NONE for s in st]
        before = [p.detach().clone() for p in params]
        opt.step()
        if backends.resolve(backend).refreshes_in_step and kw.get("scope", "tensor") == "tensor" and kw.get("threshold", "approx") == "approx":
            _check_refresh(opt, params, [s if p.grad is not None else None for s, p in zip(start, params)],
                           anchors, before)
    return params, opt


def _close(out, ref, tol, what=""):
    """Equal to rounding: elementwise, with an absolute slack of the tensor's scale (mixed-magnitude
    gradients make moments that are differences of large values: an ulp of those, not of the result)."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale, msg=what)


def _compare(ref, out, dtype):
    (p_ref, o_ref), (p_out, o_out) = ref, out
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    isolated = 0
    for a, b in zip(p_ref, p_out):
        sa, sb = o_ref.state.get(a, {}), o_out.state.get(b, {})
        assert sa.keys() == sb.keys()
        if not sa:
            continue
        assert torch.equal(sb["importance"].cpu(), sa["importance"])  # C7: one rounding order
        assert torch.equal(o_ref.isolation_mask(a), o_out.isolation_mask(b).cpu())
        for key in STATS:
            torch.testing.assert_close(sb[key].cpu(), sa[key], equal_nan=True, rtol=0, atol=0, msg=key)
        isolated += int(o_out.isolation_mask(b).sum())
        _close(b.detach().cpu(), a.detach(), tol)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            if key in sa:
                _close(sb[key].cpu(), sa[key], tol, key)
    assert isolated > 0


@pytest.mark.parametrize("dtype,kw", [
    (torch.float32, {}),
    (torch.float32, {"amsgrad": True, "maximize": True, "importance": "abs", "weight_decay": 0.3}),
    (torch.float32, {"refresh_interval": 1, "warmup_steps": 0}),  # refresh and histogram in one step
    (torch.float32, {"static": True, "warmup_steps": 3}),
    (torch.bfloat16, {}),
    (torch.float16, {"amsgrad": True}),
])
def test_parity_with_torch_backend(kernel, dtype, kw):
    # low-precision params: torch's fused AdamW is the reference, as it too does fp32 math
    fused = {"fused": True} if dtype != torch.float32 else {}
    _compare(_run("torch", "cpu", dtype, **kw, **fused), _run(*kernel, dtype, **kw), dtype)


def test_bf16_scores(kernel):
    # bf16 rounding is spelled out in the kernel (kernels/rounding.py), so even the interpreter,
    # whose own casts truncate, stores the very scores torch does
    kw = {"importance_dtype": torch.bfloat16, "refresh_interval": 3}
    _compare(_run("torch", "cpu", torch.float32, **kw), _run(*kernel, torch.float32, **kw), torch.float32)


@pytest.mark.parametrize("kw", [{"scope": "global"}, {"threshold": "exact"}])
def test_global_scope_and_exact_thresholds(kernel, kw):
    _compare(_run("torch", "cpu", torch.float32, **kw), _run(*kernel, torch.float32, **kw), torch.float32)


def test_scores_jumping_above_the_window(kernel):
    # step 3 counts the histogram for step 4's refresh: 10 % of the scores land above the window
    # (over the previous threshold x 8), so the count above the window decides the threshold
    _compare(_run("torch", "cpu", torch.float32, spike=2), _run(*kernel, torch.float32, spike=2),
             torch.float32)


def test_histogram_missed_by_the_previous_step(kernel):
    # params 2 and 4 have no gradient on the step before each refresh (steps 1, 3: t = 2, 4 refresh)
    skip = lambda t, i: i in (2, 4) and t % 2 == 0  # noqa: E731
    _compare(_run("torch", "cpu", torch.float32, skip=skip), _run(*kernel, torch.float32, skip=skip),
             torch.float32)


def test_launch_groups_of_mixed_dtypes_and_step_counts(kernel):
    def run(backend, dev):
        params = _params(torch.float32, dev)[:5] + _params(torch.bfloat16, dev, seed=1)[2:5]
        opt = EPIAdamW(params, backend=backend, **EPI)
        for t in range(5):
            for i, (p, g) in enumerate(zip(params, _grads(params, t))):
                p.grad = None if (t == 0 and i % 3 == 0) else g  # some tensors one step behind
            opt.step()
        return params, opt
    (pa, oa), (pb, ob) = run("torch", "cpu"), run(*kernel)
    for a, b in zip(pa, pb):
        assert torch.equal(oa.isolation_mask(a), ob.isolation_mask(b).cpu())
        assert int(oa.state[a]["step"]) == int(ob.state[b]["step"])
        tol = 1e-5 if a.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=tol, atol=tol)


def test_checkpoint_loaded_between_histogram_and_refresh(kernel):
    params, opt = _run(*kernel, torch.float32, steps=3)  # step 3 collected histograms for step 4
    saved = copy.deepcopy(opt.state_dict())  # as if saved to disk: no tensor shared with opt
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = EPIAdamW(fresh, backend=kernel[0], **EPI)
    opt2.load_state_dict(saved)
    for o, ps in ((opt, params), (opt2, fresh)):
        for p, g in zip(ps, _grads(ps, 3)):
            p.grad = g
        o.step()  # step 4 refreshes: opt uses its histograms, opt2 recomputes them from the scores
    for a, b in zip(params, fresh):
        assert torch.equal(opt.isolation_mask(a), opt2.isolation_mask(b))
        assert torch.equal(a, b)


def _thresholds_case(scores, ratios, anchors_of):
    ss, ks, anchors = [], [], []
    for s in scores:
        for ratio in ratios:
            k = th.isolation_k(ratio, s.numel())
            for anchor in anchors_of(s, k):
                ss.append(s)
                ks.append(k)
                anchors.append(anchor)
    return ss, ks, anchors


def _anchors(s, k):
    if k < 1 or not ((s.float() > 0) & s.float().isfinite()).any():
        return [th.KEY_NONE, 0x3F800000]
    vk = int(th.score_keys(kth_largest(s, k).reshape(1).float()))
    # window around / just above the k-th largest (answers), far below or above it (misses), none
    return [max(vk - (1 << 22), 1), vk + (1 << 23), max(vk - (5 << 23), 1), min(vk + (3 << 23), th.KEY_NONE - 1),
            th.KEY_NONE]


@pytest.mark.slow  # minutes in Triton's interpreter
def test_window_select_and_repair_kernels_match_the_reference_engine(kernel):
    backend, device = kernel

    g = torch.Generator().manual_seed(11)
    inputs = [gen(d, 4096, g) for d in DISTS] + [s for _, s in adversarial(g)] + [s for _, s in tie_inputs(g)]
    edge = [torch.zeros(100), torch.tensor([2.5]), torch.rand(50) + 1, torch.tensor(3.0), torch.zeros(0),
            torch.tensor([1e-45, 2e-45, 3e-45, 1e-40]), torch.tensor([-0.0, 0.0, float("inf"), float("nan"), 1.0, 2.0])]
    by_dtype = {}
    for s in inputs + edge:
        by_dtype.setdefault(s.dtype, []).append(s)
    checked = repaired_seen = window_seen = 0
    for dtype, scores in by_dtype.items():
        ss, ks, anchors = _thresholds_case(scores, (0.0, 0.01, 0.2), _anchors)
        ss, ks, anchors = ss + scores, ks + [s.numel() for s in scores], anchors + [th.KEY_NONE] * len(scores)
        tau, repaired, cut = window_thresholds(backend, [s.to(device) for s in ss], ks, anchors)
        for i, (s, k, anchor) in enumerate(zip(ss, ks, anchors)):
            want = th.approx_threshold([th.score_keys(s)], k, anchor)
            want_cut = th.tie_cut(th.score_keys(s), want[0], k) if want[1] else th.TIE_NONE
            assert (int(tau[i]), bool(repaired[i]), int(cut[i])) == (*want, want_cut), (dtype, s.numel(), k, anchor)
            checked += 1
            repaired_seen += want[1]
            window_seen += k > 0 and not want[1]
    assert checked > 250 and repaired_seen > 40 and window_seen > 40  # both paths exercised


def test_auto_backend(kernel):
    on_cuda = "cuda" if HAS_EXTENSION else "triton"  # cuda > triton > torch
    assert resolve_backend("auto", torch.device(kernel[1])) == (on_cuda if kernel[1] == "cuda" else "torch")


def test_cpu_tensors_outside_the_emulation_are_a_clear_error(kernel, monkeypatch):
    backend, device = kernel
    if device != "cpu":
        pytest.skip("CPU-only case")
    monkeypatch.setenv({"triton": "TRITON_INTERPRET", "cuda": "EPI_CUDA_HOST"}[backend], "0")
    p = torch.nn.Parameter(torch.ones(4))
    opt = EPIAdamW([p], backend=backend)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' needs CUDA tensors"):
        opt.step()
    assert torch.equal(p, torch.ones(4)) and not opt.state
