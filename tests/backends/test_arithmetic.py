"""One arithmetic for the moments (DESIGN.md section 6, "Numerics"; section 1, "GradScaler").

Every backend computes AdamW's moments and update in fp32, in the order of section 6, each product,
sum, quotient and square root rounded on its own, and rounds each stored value once to the storage
dtype. The expected values here are the test's own: the section 6 formulas written out in fp32
torch operations (:func:`_reference_step`; the square root numpy's correctly rounded one), with the
scalars computed in float64 and rounded once, never the code under test. Checked:

* the second moment is ``v*beta2 + ((1 - beta2)*g)*g``: from zero it stays finite for |g| up to
  about 5.8e20 (not inf from |g| ~ 1.85e19, as ``g*g*(1 - beta2)`` would be), in every backend;
* bf16 and fp16 params: moments, params and (importance="exp_avg_sq": the scores are exp_avg_sq)
  masks are bit-identical in all four backends and equal the fp32 reference rounded once; fp32
  params: bit-identical in "compiled", "triton" and "cuda" (the "torch" backend is torch's own
  AdamW for fp32, which rounds its lerp and addcmul as fused multiply-adds, and torch.sqrt of fp32
  CPU tensors is not correctly rounded; its fp32 moments are compared with torch.optim.AdamW in
  test_exp_avg_sq.py and test_optim_generic.py); also the compiled backend's uncompiled fallback;
* fp16 params with second moments too small for fp16 (stored as 0): eps works in fp32, so no
  inf/NaN in any backend;
* GradScaler: gradients are divided by the scale in fp32, as torch's fused AdamW does, so at
  isolation_ratio=0 EPIAdamW(backend="torch", fused=True) equals torch.optim.AdamW(fused=True) bit
  for bit under a GradScaler whose scale is not a power of two; bf16/fp16 gradients are divided in
  fp32 and rounded once.
"""
import numpy as np
import pytest
import torch

from epi_kernels import EPIAdamW
from support.devices import CPU_KERNEL_BACKENDS

BACKENDS = ["torch", "compiled"] + CPU_KERNEL_BACKENDS
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.01
EPI = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, importance="exp_avg_sq", isolation_ratio=0.25,
           warmup_steps=2, refresh_interval=2)  # refreshes at steps 2, 4, 6
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _f32(x: float) -> torch.Tensor:
    """A scalar computed in float64 (Python), rounded once to fp32."""
    return torch.tensor(x, dtype=torch.float64).to(torch.float32)


def _sqrt_ieee(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root (numpy's: the hardware instruction). torch.sqrt of an
    fp32 CPU tensor is not correctly rounded (MKL's vector sqrt is off by an ulp in some cases)."""
    return torch.from_numpy(np.sqrt(x.numpy()))


def _reference_step(p, g, m, v, vmax, t, isolated, *, lr=LR, betas=BETAS, eps=EPS, wd=WD, maximize=False):
    """Section 6 written out: fp32 math, every operation rounded on its own (separate eager torch
    ops: no fused multiply-add), each stored value rounded once to its dtype. Returns the new
    (p, m, v, vmax) in the storage dtype."""
    b1, b2 = betas
    decay, step_size, omb1 = _f32(1 - lr * wd), _f32(lr / (1 - b1 ** t)), _f32(1 - b1)
    beta2, omb2, bc2_sqrt, eps32 = _f32(b2), _f32(1 - b2), _f32((1 - b2 ** t) ** 0.5), _f32(eps)
    g32 = -g.float() if maximize else g.float()
    m32 = m.float() + (g32 - m.float()) * omb1
    v32 = v.float() * beta2 + (omb2 * g32) * g32
    if vmax is not None:
        v32_used = torch.maximum(vmax.float(), v32)
        vmax = v32_used.to(p.dtype)
    else:
        v32_used = v32
    update = p.float() * decay - (step_size * m32) / (_sqrt_ieee(v32_used) / bc2_sqrt + eps32)
    new_p = torch.where(isolated, p, update.to(p.dtype))
    return new_p, m32.to(p.dtype), v32.to(p.dtype), vmax


def _mixed(shape, gen, lo, hi, dtype):
    """normal times 10**U(lo, hi), 5 % exact zeros, drawn in fp32 and rounded to `dtype`."""
    x = torch.randn(shape, generator=gen) * 10.0 ** ((hi - lo) * torch.rand(shape, generator=gen) + lo)
    return torch.where(torch.rand(shape, generator=gen) < 0.05, 0.0, x).to(dtype)


def _exponents(dtype):
    # fp16 holds about 6e-8 .. 65504: gradients up to a few thousand keep v (~1e-3 g^2) finite in fp16
    return (-6, 3) if dtype == torch.float16 else (-6, 6)


SHAPES = [(300,), (7, 11)]
_RUNS: dict = {}


def _run(backend, dtype, kw):
    """_run_checked, once per (backend, dtype, kw) in this session (the interpreter is slow)."""
    key = (backend, dtype, tuple(sorted(kw.items())))
    if key not in _RUNS:
        _RUNS[key] = _run_checked(backend, dtype, 6, kw)
    return _RUNS[key]


def _runnable(backends):
    """The names of `backends` that can run here (a CPU_KERNEL_BACKENDS param whose skipif holds is
    left out, as pytest would skip it)."""
    names = []
    for b in backends:
        if isinstance(b, str):
            names.append(b)
        elif not any(m.name == "skipif" and m.args and m.args[0] for m in b.marks):
            names.append(b.values[0])
    return names


def _run_checked(backend, dtype, steps, kw):
    """Run `backend` on fixed params and mixed-magnitude gradients; after every step, its moments
    and params must equal the section 6 reference computed from its state before the step and the
    mask it applied. Returns (params, optimizer, masks applied per step)."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = EPIAdamW(params, backend=backend, **{**EPI, **kw})
    lo, hi = _exponents(dtype)
    masks = []
    for t in range(1, steps + 1):
        grads = [_mixed(p.shape, gen, lo, hi, dtype) for p in params]
        before = []
        for p, g in zip(params, grads):
            p.grad = g.clone()
            st = opt.state.get(p, {})
            zeros = torch.zeros_like(p)
            before.append((p.detach().clone(), g, st.get("exp_avg", zeros).clone(), st.get("exp_avg_sq", zeros).clone(),
                           st.get("max_exp_avg_sq", zeros).clone() if kw.get("amsgrad") else None))
        opt.step()
        masks.append([opt.isolation_mask(p).clone() for p in params])
        for p, (p0, g, m0, v0, vm0), mask in zip(params, before, masks[-1]):
            want_p, want_m, want_v, want_vm = _reference_step(p0, g, m0, v0, vm0, t, mask,
                                                              maximize=kw.get("maximize", False))
            st = opt.state[p]
            what = f"{backend} {dtype} step {t} {tuple(p.shape)}"
            assert torch.equal(st["exp_avg_sq"], want_v), what + " exp_avg_sq"
            assert torch.equal(st["exp_avg"], want_m), what + " exp_avg"
            if want_vm is not None:
                assert torch.equal(st["max_exp_avg_sq"], want_vm), what + " max_exp_avg_sq"
            assert torch.equal(p.detach(), want_p), what + " param"
            assert torch.isfinite(p).all() and torch.isfinite(st["exp_avg_sq"]).all(), what
    assert any(m.any() for step in masks for m in step), "nothing was isolated"
    return params, opt, masks


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True, "maximize": True}], ids=["plain", "amsgrad-maximize"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_params_are_fp32_math_rounded_once(backend, dtype, kw):
    """bf16/fp16 params: every backend, the torch backend included, stores exactly the section 6
    fp32 result rounded once (not torch's for-loop/foreach arithmetic in the param dtype)."""
    _run(backend, dtype, kw)


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True, "maximize": True}], ids=["plain", "amsgrad-maximize"])
@pytest.mark.parametrize("backend", ["compiled"] + CPU_KERNEL_BACKENDS)
def test_fp32_params_are_section_6_arithmetic_in_the_compiled_and_kernel_backends(backend, kw):
    _run(backend, torch.float32, kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_compiled_backends_uncompiled_fallback_is_the_same_arithmetic(dtype, monkeypatch):
    """Where torch.compile cannot build its kernel, the compiled backend runs its step function
    eagerly (torch.sqrt of fp32 CPU tensors is not correctly rounded: it must not be used there)."""
    import epi_kernels.backends.compiled as compiled

    monkeypatch.setattr(compiled, "_broken", "compilation disabled by the test")
    _run_checked("compiled", dtype, 4, {"amsgrad": True})


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_avg_sq_and_masks_are_bit_identical_across_backends(dtype):
    """importance="exp_avg_sq": the scores ARE exp_avg_sq, so equal moments give equal masks. For
    fp32 params the torch backend is torch's own AdamW (fused multiply-adds), so it is left out."""
    names = [b for b in _runnable(BACKENDS) if not (b == "torch" and dtype == torch.float32)]
    runs = {name: _run(name, dtype, {}) for name in names}
    assert len(runs) >= 2
    (first, (pa, oa, ma)), *rest = runs.items()
    for name, (pb, ob, mb) in rest:
        for step_a, step_b in zip(ma, mb):
            for x, y in zip(step_a, step_b):
                assert torch.equal(x, y), (first, name, "mask")
        for a, b in zip(pa, pb):
            assert torch.equal(a.detach(), b.detach()), (first, name, "param")
            for key in MOMENTS:
                if key in oa.state[a]:
                    assert torch.equal(oa.state[a][key], ob.state[b][key]), (first, name, key)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exp_avg_sq_stays_finite_for_gradients_whose_square_overflows(backend, dtype):
    """|g| from ~1.9e19 to ~3e20: g*g overflows fp32, ((1 - beta2)*g)*g does not (nor, at step 2, the
    sum of two of them). The largest
    second moments are the largest scores and must be isolated at the step-2 refresh (a score of
    inf would never be)."""
    gen = torch.Generator().manual_seed(3)
    n = 256
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
    huge = torch.zeros(n, dtype=torch.bool)
    huge[::37] = True  # 7 elements, under the 64 isolated ones (25 %)
    big = torch.tensor([1.9e19, -2.0e19, 3.3e19, -6.0e19, 1.0e20, -2.0e20, 3.0e20])
    opt = EPIAdamW([p], backend=backend, **EPI)
    for t in (1, 2):
        g = _mixed((n,), gen, -6, 6, torch.float32)
        g[huge] = big * (1 + 0.01 * t)
        p.grad = g.to(dtype)
        p0, st = p.detach().clone(), opt.state.get(p, {})
        m0 = st.get("exp_avg", torch.zeros_like(p)).clone()
        v0 = st.get("exp_avg_sq", torch.zeros_like(p)).clone()
        opt.step()
        v = opt.state[p]["exp_avg_sq"]
        assert torch.isfinite(v).all(), (backend, t, v[~torch.isfinite(v)])
        if t == 1:  # from zero moments every backend (torch's AdamW too) rounds the same products
            want_p, want_m, want_v, _ = _reference_step(p0, p.grad, m0, v0, None, t, opt.isolation_mask(p))
            assert torch.equal(v, want_v) and torch.equal(opt.state[p]["exp_avg"], want_m)
            if not (backend == "torch" and dtype == torch.float32):  # (torch's AdamW: torch.sqrt)
                assert torch.equal(p.detach(), want_p)
    mask = opt.isolation_mask(p)
    assert int(mask.sum()) > 0 and bool(mask[huge].all()), (backend, mask[huge])
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_second_moments_below_fp16_range_give_no_inf_or_nan(backend):
    """Gradients of 1e-9 .. 1e-5 (and zeros): v ~ 1e-3 g^2 is stored as 0 in fp16. The update
    divides by sqrt(v)/bc2 + eps in fp32 (eps = 1e-8 is 0 in fp16, so fp16 math divides by 0)."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(200, generator=gen).to(torch.float16))
    opt = EPIAdamW([p], backend=backend, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, isolation_ratio=0.0)
    for t in range(1, 4):
        p.grad = _mixed(p.shape, gen, -9, -5, torch.float16)
        p0, st = p.detach().clone(), opt.state.get(p, {})
        m0 = st.get("exp_avg", torch.zeros_like(p)).clone()
        v0 = st.get("exp_avg_sq", torch.zeros_like(p)).clone()
        opt.step()
        st = opt.state[p]
        assert (st["exp_avg_sq"] == 0).float().mean() > 0.5  # the case at hand: v underflows
        for x in (p.detach(), st["exp_avg"], st["exp_avg_sq"]):
            assert torch.isfinite(x).all(), (backend, t)
        want_p, want_m, want_v, _ = _reference_step(p0, p.grad, m0, v0, None, t, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p.detach(), want_p) and torch.equal(st["exp_avg"], want_m)
        assert torch.equal(st["exp_avg_sq"], want_v)


def _scaler_run(make_opt, scale, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen) * 10.0 ** (4 * torch.rand(32, 1, generator=gen) - 2)
        loss = model(x).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == scale  # no overflow: every step ran
        grads.append([p.grad.clone() for p in model.parameters()])
    return model, opt, grads


@pytest.mark.parametrize("scale", [3.0, 1000.0, 65537.0])
def test_grad_scaler_unscales_like_torch_fused_adamw(scale):
    """Not a power of two: multiplying by fp32(1/scale) differs from dividing by the scale in some
    elements. Ratio 0, torch backend, fused=True: torch.optim.AdamW(fused=True) bit for bit."""
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    m_ref, o_ref, g_ref = _scaler_run(lambda ps: torch.optim.AdamW(ps, **kw), scale)
    m_epi, o_epi, g_epi = _scaler_run(
        lambda ps: EPIAdamW(ps, backend="torch", isolation_ratio=0.0, **kw), scale)
    for t, (gr, ge) in enumerate(zip(g_ref, g_epi)):
        for a, b in zip(gr, ge):
            assert torch.equal(a, b), f"unscaled gradient, step {t}"
    for a, b in zip(m_ref.parameters(), m_epi.parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o_ref.state[a][key], o_epi.state[b][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_divides_the_gradients_in_fp32(backend):
    """GradScaler.step's hand-over (grad_scale, found_inf) on every backend: the gradients the step
    uses, and leaves behind, are the scaled ones divided by the fp32 scale (one correctly rounded
    fp32 quotient, computed here in float64 and rounded once)."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = EPIAdamW(params, backend=backend, **EPI)
    ref = EPIAdamW(twins, backend=backend, **EPI)
    scale = torch.tensor(1000.0)
    for t in range(1, 4):
        for p, q in zip(params, twins):
            scaled = _mixed(p.shape, gen, -3, 3, torch.float32)
            p.grad = scaled.clone()
            q.grad = (scaled.double() / scale.double()).float()
        opt.grad_scale, opt.found_inf = scale, torch.tensor([0.0])
        opt.step()
        ref.step()
        for p, q in zip(params, twins):
            assert torch.equal(p.grad, q.grad), (backend, t)
            assert torch.equal(p.detach(), q.detach()), (backend, t)
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


def test_the_eager_square_root_is_correctly_rounded():
    """The torch backend's fp32 square root (its bf16/fp16 path) against the hardware's IEEE one, on
    values of every binade, subnormals, 0 and inf included."""
    from epi_kernels.backends.eager import sqrt_rn

    gen = torch.Generator().manual_seed(2)
    n = 200_000
    bits = torch.randint(0, 0x7F800001, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, float("inf"), 1e-45, 3.4e38])])
    assert torch.equal(sqrt_rn(x), _sqrt_ieee(x))


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 3.0), (torch.float16, 65536.0), (torch.float16, 1000.0)],
                         ids=["bf16-3", "fp16-65536", "fp16-1000"])
def test_low_precision_gradients_are_divided_in_fp32_and_rounded_once(dtype, scale):
    """bf16/fp16 gradients: fp32(g) / fp32(scale), rounded once to the gradient's dtype (65536,
    GradScaler's default scale, is not even finite in fp16)."""
    gen = torch.Generator().manual_seed(12)
    p = torch.nn.Parameter(torch.randn(300, generator=gen).to(dtype))
    opt = EPIAdamW([p], backend="torch", **EPI)
    scaled = (_mixed(p.shape, gen, -6, 2, torch.float32) * 100).to(dtype)
    p.grad = scaled.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor([0.0])
    opt.step()
    assert torch.equal(p.grad, (scaled.double() / scale).float().to(dtype))
