"""Generic optimizer checks for EPIAdamW, driven by PyTorch's own optimizer test machinery.

The configs come from torch.testing._internal.common_optimizers (AdamW's constructor inputs and
error inputs, plus the for-loop / foreach / fused variants), and the tests are instantiated per
device with instantiate_device_type_tests (cpu always, cuda when available). The test bodies are
written for EPIAdamW; the main oracle is torch.optim.AdamW itself:

* isolation_ratio=0 must be torch.optim.AdamW, bit for bit;
* isolation_ratio>0 must be AdamW's step with the isolated elements put back to their old values.

Every config gets EPI kwargs that make refreshes happen within a few steps (warmup 2, interval 2,
20 % isolated), so isolation is really exercised by all the generic checks.
"""
from __future__ import annotations

import io
from copy import deepcopy

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal.common_utils imports it
_flags_frozen = torch.backends.flags_frozen()

from torch.nn import Parameter  # noqa: E402
from torch.optim import AdamW  # noqa: E402
from torch.testing._internal.common_device_type import instantiate_device_type_tests  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_error_inputs_func_adamw,
    optim_inputs_func_adamw,
    optims,
)
from torch.testing._internal.common_utils import TestCase  # noqa: E402

# Importing common_utils calls torch.backends.disable_global_flags() (a rule of PyTorch's own suite);
# undo that so other test files in the same session may still set torch.backends flags.
if not _flags_frozen:
    torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True

from epi_kernels import EPIAdamW  # noqa: E402

EPI = dict(isolation_ratio=0.2, refresh_interval=2, warmup_steps=2)  # refreshes at steps 2, 4, 6, ...
EPI_KEYS = ("isolation_ratio", "refresh_interval", "warmup_steps", "importance_beta", "importance",
            "scope", "threshold", "static", "importance_dtype", "backend")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _epi_inputs(device, dtype=None):
    """AdamW's configs with EPI kwargs, plus two that switch the other EPI options on."""
    inputs = [OptimizerInput(params=None, kwargs={**o.kwargs, **EPI}, desc=o.desc)
              for o in optim_inputs_func_adamw(device, dtype)]
    return inputs + [
        OptimizerInput(params=None, kwargs={**EPI, "weight_decay": 0.1, "scope": "global",
                                            "threshold": "exact", "importance": "abs",
                                            "importance_dtype": torch.bfloat16},
                       desc="epi: global scope, exact threshold, abs scores in bf16"),
        OptimizerInput(params=None, kwargs={**EPI, "static": True, "importance_beta": 0.5},
                       desc="epi: static mask"),
    ]


def _epi_error_inputs(device, dtype):
    """AdamW's error inputs (EPIAdamW must answer them like AdamW) plus EPI's own rejections."""
    p = Parameter(torch.randn(3, device=device, dtype=dtype))
    return optim_error_inputs_func_adamw(device, dtype) + [
        ErrorOptimizerInput(
            OptimizerInput(params=[p], kwargs={"differentiable": True}, desc="differentiable"),
            error_type=ValueError, error_regex="differentiable"),
        ErrorOptimizerInput(OptimizerInput(params=[p], kwargs={"isolation_ratio": 1.0}, desc="ratio 1"),
                            error_type=ValueError, error_regex="Invalid isolation_ratio"),
        ErrorOptimizerInput(
            OptimizerInput(params=[torch.randn(3, device=device, dtype=torch.complex64)], kwargs={},
                           desc="complex param"),
            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError, error_regex="complex"),
    ]


epi_db = [OptimizerInfo(
    EPIAdamW,
    optim_inputs_func=_epi_inputs,
    optim_error_inputs_func=_epi_error_inputs,
    supported_impls=("foreach", "fused"),
    not_og_supported_flags=("foreach", "fused", "differentiable", "maximize", "capturable"),
    supports_fused_on=("cpu", "cuda"),
    has_capturable_arg=True,
    supports_complex=False,
)]


# ---------------------------------------------------------------------------------------- helpers

def _configs(device, dtype, info):
    """Every config x impl (for-loop, foreach=True, fused=True); kwargs deep-copied per use."""
    return _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, info)


# torch warns about a group holding a parameter twice ("in future, this will cause an error"); EPIAdamW
# refuses it now: stepped twice per step, its scores would follow neither rule (DESIGN.md)
DEPARTURES = {"a param group cannot have duplicate parameters": (ValueError, "appears in it twice")}


def _adamw_kwargs(kwargs):
    return {k: v for k, v in deepcopy(kwargs).items() if k not in EPI_KEYS}


def _randn(gen, shape, device, dtype):
    # drawn in float64 on the CPU so every dtype/device starts from the same numbers
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _params(device, dtype, seed=0, odd=False):
    """Small tensors of odd shapes; [2] is a transposed (non-contiguous) view. `odd` adds a
    0-dim and an empty tensor."""
    gen = torch.Generator().manual_seed(seed)
    ps = [_randn(gen, (5, 3), device, dtype), _randn(gen, (7,), device, dtype),
          _randn(gen, (6, 4), device, dtype).t(), _randn(gen, (2, 3, 5), device, dtype)]
    if odd:
        ps += [_randn(gen, (), device, dtype), _randn(gen, (0, 3), device, dtype)]
    assert not ps[2].is_contiguous()
    return ps


def _clone(params):
    return [p.detach().clone() for p in params]  # clone keeps the transposed strides


def _grads(params, step):
    """Deterministic grads for `step`, with the strides of their params."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.empty_like(p).copy_(_randn(gen, p.shape, p.device, p.dtype)) for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        _set_grads(params, _grads(params, t))
        opt.step()


class TestEPIOptimGeneric(TestCase):
    def _same(self, a, b, msg=None):
        """Bit-exact (up to 0.0 == -0.0 and NaN == NaN)."""
        self.assertEqual(a, b, atol=0, rtol=0, msg=msg)

    def _same_moments(self, opt_a, params_a, opt_b, params_b, exact=True):
        tol = dict(atol=0, rtol=0) if exact else {}  # else: TestCase's default tolerance
        for pa, pb in zip(params_a, params_b):
            sa, sb = opt_a.state[pa], opt_b.state[pb]
            for key in MOMENTS:
                self.assertEqual(key in sa, key in sb, msg=key)
                if key in sa:
                    self.assertEqual(sa[key], sb[key], **tol, msg=key)

    def _lockstep(self, opt_a, params_a, opt_b, params_b, start, steps):
        """Step two optimizers on identical grads; params and masks must stay bit-identical."""
        for t in range(start, start + steps):
            grads = _grads(params_a, t)
            _set_grads(params_a, grads)
            _set_grads(params_b, grads)
            opt_a.step()
            opt_b.step()
            for pa, pb in zip(params_a, params_b):
                self._same(pa, pb, msg=f"step {t}")
                self._same(opt_a.isolation_mask(pa), opt_b.isolation_mask(pb), msg=f"mask, step {t}")
        self.assertTrue(any(opt_a.isolation_mask(p).any() for p in params_a), "nothing was isolated")

    # ------------------------------------------------------------------------------- oracles

    @optims(epi_db, dtypes=[torch.float32, torch.float64, torch.bfloat16])
    def test_ratio_zero_matches_adamw(self, device, dtype, optim_info):
        # fp32/fp64: torch's own AdamW runs, bit for bit. bf16: every backend computes in fp32 and rounds
        # each stored value once (DESIGN.md section 6), as torch's fused AdamW does, not as its for-loop
        # or foreach AdamW (bf16 math): compared with fused=True, to bf16 rounding
        exact = dtype != torch.bfloat16
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                ref_p = _params(device, dtype)
                epi_p = _clone(ref_p)
                adamw_kwargs = _adamw_kwargs(inp.kwargs)
                if not exact:
                    adamw_kwargs.update(fused=True, foreach=None)
                ref = AdamW(ref_p, **adamw_kwargs)
                epi = EPIAdamW(epi_p, **{**deepcopy(inp.kwargs), "isolation_ratio": 0.0})
                for t in range(8):
                    grads = _grads(ref_p, t)
                    _set_grads(ref_p, grads)
                    _set_grads(epi_p, grads)
                    ref.step()
                    epi.step()
                    for r, e in zip(ref_p, epi_p):
                        if exact:
                            self._same(e, r, msg=f"step {t}")
                        else:
                            self.assertEqual(e, r, msg=f"step {t}")  # (TestCase's bf16 tolerance)
                        self.assertFalse(epi.isolation_mask(e).any())
                    self._same_moments(epi, epi_p, ref, ref_p, exact=exact)
                # the comparison is not vacuous: AdamW did move every param
                for r, p0 in zip(ref_p, _params(device, dtype)):
                    self.assertFalse(torch.equal(r, p0))

    @optims(epi_db, dtypes=[torch.float32])
    def test_masked_step_matches_adamw_oracle(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                epi_p = _params(device, dtype)
                ref_p = _clone(epi_p)
                epi = EPIAdamW(epi_p, **deepcopy(inp.kwargs))
                ref = AdamW(ref_p, **_adamw_kwargs(inp.kwargs))
                prev_masks = None
                for t in range(8):  # EPI steps 1..8: refreshes at 2, 4, 6, 8 (static: only 2)
                    grads = _grads(epi_p, t)
                    _set_grads(epi_p, grads)
                    _set_grads(ref_p, grads)
                    old = _clone(epi_p)
                    with torch.no_grad():  # AdamW steps from EPI's current point
                        for r, e in zip(ref_p, epi_p):
                            r.copy_(e)
                    epi.step()
                    ref.step()
                    masks = [epi.isolation_mask(e) for e in epi_p]  # the mask in force during this step
                    for e, r, o, m in zip(epi_p, ref_p, old, masks):
                        self._same(e, torch.where(m, o, r), msg=f"step {t + 1}")
                    # moments (and max_exp_avg_sq) update for isolated elements too
                    self._same_moments(epi, epi_p, ref, ref_p)
                    step = t + 1
                    if step < 2:
                        self.assertFalse(any(m.any() for m in masks), "isolation before the warmup")
                    else:  # ratio 0.2 of >= 7 elements: every tensor isolates something
                        for m in masks:
                            self.assertTrue(0 < m.sum() < m.numel(), f"step {step}: {m.sum()} isolated")
                    refresh = step == 2 or (step % 2 == 0 and not inp.kwargs.get("static"))
                    if prev_masks is not None and not refresh:
                        for m, pm in zip(masks, prev_masks):
                            self._same(m, pm, msg=f"mask changed without a refresh at step {step}")
                    prev_masks = masks

    # ------------------------------------------------------------------------------- errors

    @optims(epi_db, dtypes=[torch.float32])
    def test_errors(self, device, dtype, optim_info):
        for err in optim_info.optim_error_inputs_func(device, dtype):
            inp = err.optimizer_error_input
            with self.subTest(desc=inp.desc):
                params = inp.params if inp.params is not None else [Parameter(torch.randn(2, device=device))]
                if inp.desc in DEPARTURES:  # where EPIAdamW deliberately refuses what torch warns about
                    with self.assertRaisesRegex(*DEPARTURES[inp.desc]):
                        EPIAdamW(params, **inp.kwargs)
                elif err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                    warns = issubclass(err.error_type, Warning)
                    check = self.assertWarnsRegex if warns else self.assertRaisesRegex
                    with check(err.error_type, err.error_regex):
                        EPIAdamW(params, **inp.kwargs)
                else:
                    opt = EPIAdamW(params, **inp.kwargs)
                    for p in params:
                        p.grad = torch.rand_like(p)
                    with self.assertRaisesRegex(err.error_type, err.error_regex):
                        opt.step()

    @optims(epi_db, dtypes=[torch.float32])
    def test_sparse_grad_raises(self, device, dtype, optim_info):
        p = Parameter(torch.randn(4, 3, device=device, dtype=dtype))
        opt = EPIAdamW([p], **EPI)
        p.grad = torch.randn(4, 3, device=device, dtype=dtype).to_sparse()
        before = p.detach().clone()
        with self.assertRaisesRegex(RuntimeError, "sparse"):
            opt.step()
        self._same(p, before)
        self.assertEqual(len(opt.state), 0)

    # ------------------------------------------------------------------------------- behaviour

    @optims(epi_db, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info):
        for inp in optim_info.optim_inputs_func(device, dtype):
            for contiguous in (True, False):
                with self.subTest(desc=inp.desc, contiguous=contiguous):
                    gen = torch.Generator().manual_seed(3)
                    w = _randn(gen, (5, 2) if contiguous else (2, 5), device, dtype)
                    w = w if contiguous else w.t()
                    w.requires_grad_()
                    b = _randn(gen, (5,), device, dtype).requires_grad_()
                    x = _randn(gen, (2,), device, dtype)
                    self.assertEqual(w.is_contiguous(), contiguous)
                    opt = EPIAdamW([w, b], **{**deepcopy(inp.kwargs), "foreach": False})
                    sign = -1.0 if inp.kwargs.get("maximize") else 1.0

                    def closure():
                        opt.zero_grad()
                        loss = (w @ x + b).pow(2).sum()
                        (sign * loss).backward()  # a maximizing optimizer gets -loss
                        return loss

                    first = closure().item()
                    for _ in range(20):
                        opt.step(closure)
                    self.assertLess(closure().item(), first - 0.01)
                    self.assertTrue(opt.isolation_mask(w).any())

    @optims(epi_db, dtypes=[torch.float32])
    def test_param_groups_lr_and_weight_decay(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                epi_p = _params(device, dtype)
                ref_p = _clone(epi_p)
                frozen0 = epi_p[3].clone()

                def groups(ps):
                    return [{"params": ps[:2], "lr": 0.05, "weight_decay": 0.5},
                            {"params": [ps[2]]},  # defaults from the config
                            {"params": [ps[3]], "lr": 1e-28, "weight_decay": 0.0}]

                epi = EPIAdamW(groups(epi_p), **deepcopy(inp.kwargs))
                ref = AdamW(groups(ref_p), **_adamw_kwargs(inp.kwargs))
                for t in range(6):
                    _set_grads(epi_p, _grads(epi_p, t))
                    _set_grads(ref_p, _grads(ref_p, t))
                    old = _clone(epi_p)
                    with torch.no_grad():
                        for r, e in zip(ref_p, epi_p):
                            r.copy_(e)
                    epi.step()
                    ref.step()
                    for e, r, o in zip(epi_p, ref_p, old):  # AdamW with the groups' lr/wd, minus isolated
                        self._same(e, torch.where(epi.isolation_mask(e), o, r), msg=f"step {t + 1}")
                self._same(epi_p[3], frozen0, msg="lr=1e-28 group changed")
                # the big-lr group really moved far more than the default one
                self.assertGreater((epi_p[0] - _params(device, dtype)[0]).abs().max(), 0.1)

    @optims(epi_db, dtypes=[torch.float32])
    def test_step_is_noop_without_grads_or_with_zero_grads(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                params = _params(device, dtype)
                before = _clone(params)
                opt = EPIAdamW(params, **{**deepcopy(inp.kwargs), "weight_decay": 0.0})
                opt.step()  # no grads at all
                self.assertEqual(len(opt.state), 0)
                for p, b in zip(params, before):
                    self._same(p, b)
                for _ in range(4):  # zero grads through a refresh: zero update, nothing isolated
                    _set_grads(params, [torch.zeros_like(p) for p in params])
                    opt.step()
                for p, b in zip(params, before):
                    self._same(p, b)
                    self.assertEqual(opt.state[p]["step"].item(), 4)
                    self.assertFalse(opt.isolation_mask(p).any())

    # ------------------------------------------------------------------------------- state dicts

    def _trained(self, kwargs, device, dtype, steps=3):
        params = _params(device, dtype)
        opt = EPIAdamW(params, **deepcopy(kwargs))
        _run(opt, params, steps)
        return opt, params

    @optims(epi_db, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                opt, params = self._trained(inp.kwargs, device, dtype)  # 3 steps: one refresh done
                saved = deepcopy(opt.state_dict())
                params2 = _clone(params)
                opt2 = EPIAdamW(params2, **deepcopy(inp.kwargs))
                opt2.load_state_dict(saved)
                for p, p2 in zip(params, params2):
                    self._same(opt.isolation_mask(p), opt2.isolation_mask(p2))
                self._lockstep(opt, params, opt2, params2, start=3, steps=6)  # refreshes at 4, 6, 8
                self.assertEqual(opt.state_dict(), opt2.state_dict(), atol=0, rtol=0)

    @optims(epi_db, dtypes=[torch.float32])
    def test_can_load_older_state_dict(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                opt, params = self._trained(inp.kwargs, device, dtype)
                ref_p = _params(device, dtype)
                ref = AdamW(ref_p, **_adamw_kwargs(inp.kwargs))
                _run(ref, ref_p, 3)
                old, ref_old = deepcopy(opt.state_dict()), deepcopy(ref.state_dict())
                for sd in (old, ref_old):  # as saved before these flags existed
                    for group in sd["param_groups"]:
                        for flag in optim_info.not_og_supported_flags:
                            group.pop(flag, None)
                params2 = _clone(params)
                opt2 = EPIAdamW(params2, **deepcopy(inp.kwargs))
                opt2.load_state_dict(old)
                ref.load_state_dict(ref_old)
                for g, rg in zip(opt2.param_groups, ref.param_groups):  # same back-compat defaults as AdamW
                    for flag in optim_info.not_og_supported_flags:
                        self.assertEqual(g[flag], rg[flag], msg=flag)
                before = _clone(params2)
                _run(opt2, params2, 3, start=3)
                for p, b in zip(params2, before):
                    self.assertTrue(p.isfinite().all())
                    self.assertFalse(torch.equal(p, b))

    @optims(epi_db, dtypes=[torch.float32])
    def test_save_load_weights_only(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                opt, params = self._trained(inp.kwargs, device, dtype)
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                loaded = torch.load(buf, weights_only=True)
                params2 = _clone(params)
                opt2 = EPIAdamW(params2, **deepcopy(inp.kwargs))
                opt2.load_state_dict(loaded)
                self._lockstep(opt, params, opt2, params2, start=3, steps=6)

    @optims(epi_db, dtypes=[torch.float32])
    def test_load_nontensor_step(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                opt, params = self._trained(inp.kwargs, device, dtype)
                sd = deepcopy(opt.state_dict())
                for st in sd["state"].values():
                    st["step"] = st["step"].item()  # as very old checkpoints stored it
                params2 = _clone(params)
                opt2 = EPIAdamW(params2, **deepcopy(inp.kwargs))
                opt2.load_state_dict(sd)
                for p, p2 in zip(params, params2):
                    s, s2 = opt.state[p]["step"], opt2.state[p2]["step"]
                    self.assertTrue(torch.is_tensor(s2))
                    self.assertEqual((s2.dtype, s2.device), (s.dtype, s.device))
                self._lockstep(opt, params, opt2, params2, start=3, steps=6)

    # ------------------------------------------------------------------------------- python object

    @optims(epi_db, dtypes=[torch.float32])
    def test_deepcopy_repr_and_state(self, device, dtype, optim_info):
        for inp in _configs(device, dtype, optim_info):
            with self.subTest(desc=inp.desc):
                params = _params(device, dtype)
                opt = EPIAdamW(params, **deepcopy(inp.kwargs))
                _set_grads(params, _grads(params, 0))
                opt.step()
                self.assertEqual(len(opt.state), len(params))
                for p in params:
                    self.assertTrue({"step", "exp_avg", "exp_avg_sq", "importance"} <= set(opt.state[p]))
                _run(opt, params, 2, start=1)

                cp = deepcopy(opt)
                public = {k for k in vars(opt) if not k.startswith("_")}
                self.assertEqual(public, {k for k in vars(cp) if not k.startswith("_")})
                self.assertEqual(opt.defaults, cp.defaults)
                cp_params = [p for g in cp.param_groups for p in g["params"]]
                for g, cg in zip(opt.param_groups, cp.param_groups):
                    self.assertEqual({k: v for k, v in g.items() if k != "params"},
                                     {k: v for k, v in cg.items() if k != "params"})
                for p, cpp in zip(params, cp_params):
                    self.assertIsNot(p, cpp)
                    self.assertEqual(opt.state[p], cp.state[cpp], atol=0, rtol=0)
                # the copy is independent and continues exactly like the original
                self._lockstep(opt, params, cp, cp_params, start=3, steps=4)

                text = repr(opt)
                for needle in ("EPIAdamW", "Parameter Group 0", "isolation_ratio: 0.2", "weight_decay",
                               "refresh_interval: 2", "lr"):
                    self.assertIn(needle, text)

    @optims(epi_db, dtypes=[torch.float32])
    def test_hooks(self, device, dtype, optim_info):
        params = _params(device, dtype)
        opt = EPIAdamW(params, **EPI)
        calls = []
        handles = [
            opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("step_pre", o is opt))),
            opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("step_post", o is opt))),
        ]
        _run(opt, params, 3)
        self.assertEqual(calls, [("step_pre", True), ("step_post", True)] * 3)

        def sd_post(o, sd):
            calls.append(("sd_post", "state" in sd))
            sd["hook_was_here"] = 1
            return sd

        calls.clear()
        handles += [opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o is opt))),
                    opt.register_state_dict_post_hook(sd_post)]
        sd = opt.state_dict()
        self.assertEqual(calls, [("sd_pre", True), ("sd_post", True)])
        self.assertEqual(sd["hook_was_here"], 1)

        def load_pre(o, sd):
            calls.append(("load_pre", o is opt))
            sd = deepcopy(sd)
            sd["param_groups"][0]["lr"] = 0.5  # a pre hook may rewrite what gets loaded
            return sd

        calls.clear()
        handles += [opt.register_load_state_dict_pre_hook(load_pre),
                    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o is opt)))]
        opt.load_state_dict(sd)
        self.assertEqual(calls, [("load_pre", True), ("load_post", True)])
        self.assertEqual(opt.param_groups[0]["lr"], 0.5)

        for h in handles:  # removed hooks stay silent
            h.remove()
        calls.clear()
        opt.load_state_dict(opt.state_dict())
        _run(opt, params, 1, start=3)
        self.assertEqual(calls, [])

    def _isolating(self, device, dtype):
        params = _params(device, dtype)
        opt = EPIAdamW(params, **EPI)
        _run(opt, params, 3)  # refreshed at step 2
        masks = [opt.isolation_mask(p) for p in params]
        self.assertTrue(all(m.any() for m in masks))
        return opt, params, masks

    @optims(epi_db, dtypes=[torch.float32])
    def test_load_state_dict_post_hook_sees_epi_state(self, device, dtype, optim_info):
        opt, params, masks = self._isolating(device, dtype)
        opt2 = EPIAdamW(_clone(params), **EPI)
        seen = []
        opt2.register_load_state_dict_post_hook(  # documented to run after the state is loaded
            lambda o: seen.extend(o.isolation_mask(p) for p in o.param_groups[0]["params"]))
        opt2.load_state_dict(deepcopy(opt.state_dict()))
        self.assertEqual(len(seen), len(masks))
        for s, m in zip(seen, masks):
            self._same(s, m)

    @optims(epi_db, dtypes=[torch.float32])
    def test_load_state_dict_pre_hook_sees_and_rewrites_epi_state(self, device, dtype, optim_info):
        opt, params, _ = self._isolating(device, dtype)
        opt2 = EPIAdamW(_clone(params), **EPI)
        seen = []

        def clear_masks(o, sd):  # documented: the returned state dict is what gets loaded
            sd = deepcopy(sd)
            for st in sd["state"].values():
                seen.append("isolation_mask" in st)
                if "isolation_mask" in st:
                    st["isolation_mask"].zero_()
            return sd

        opt2.register_load_state_dict_pre_hook(clear_masks)
        opt2.load_state_dict(deepcopy(opt.state_dict()))
        self.assertEqual(seen, [True] * len(params))
        for p in opt2.param_groups[0]["params"]:
            self.assertFalse(opt2.isolation_mask(p).any())

    # ------------------------------------------------------------------------------- impls

    def _impl_pair(self, device, dtype, base_kwargs, flag, compare):
        """Run for-loop and `flag`=True side by side on odd params (0-dim, empty, non-contiguous);
        all grads are None at step 2, and the (2, 3, 5) param has no grad at steps 3-5."""
        loop_p, impl_p = _params(device, dtype, odd=True), _params(device, dtype, odd=True)
        loop = EPIAdamW(loop_p, **{**deepcopy(base_kwargs), "foreach": False, "fused": False})
        impl = EPIAdamW(impl_p, **{**deepcopy(base_kwargs), flag: True})
        for t in range(9):
            grads = [None] * len(loop_p) if t == 2 else _grads(loop_p, t)
            if t in (3, 4, 5):
                grads[-3] = None
            held = loop_p[-3].clone()
            _set_grads(loop_p, grads)
            _set_grads(impl_p, grads)
            loop.step()
            impl.step()
            if t in (3, 4, 5):
                self._same(loop_p[-3], held, msg="param without grad changed")
            compare(loop, loop_p, impl, impl_p, t)
        self.assertTrue(any(loop.isolation_mask(p).any() for p in loop_p), "nothing was isolated")

    @optims(epi_db, dtypes=[torch.float64])
    def test_foreach_matches_forloop(self, device, dtype, optim_info):
        # Both run torch's own for-loop / foreach Adam and the same score update. On the CPU the
        # foreach ops are per-tensor loops of the same kernels, so the results must be exact; CUDA's
        # multi-tensor kernels may round differently, so there TestCase's float64 tolerance applies.
        exact = torch.device(device).type == "cpu"
        tol = dict(atol=0, rtol=0) if exact else {}

        def compare(loop, loop_p, impl, impl_p, t):
            for a, b in zip(loop_p, impl_p):
                self.assertEqual(b, a, **tol, msg=f"step {t}")
                self._same(impl.isolation_mask(b), loop.isolation_mask(a), msg=f"mask, step {t}")
            self._same_moments(impl, impl_p, loop, loop_p, exact)

        for inp in optim_info.optim_inputs_func(device, dtype):
            with self.subTest(desc=inp.desc):
                self._impl_pair(device, dtype, inp.kwargs, "foreach", compare)

    @optims(epi_db, dtypes=[torch.float32])
    def test_fused_matches_forloop(self, device, dtype, optim_info):
        # Fused AdamW rounds differently, so compare with TestCase's default fp32 tolerance (as
        # PyTorch's fused tests do), re-aligning each step (TensorTracker) so errors cannot compound.
        # Masks come from identical scores and must match exactly.
        def compare(loop, loop_p, impl, impl_p, t):
            tracker = TensorTracker()
            for a in loop_p:
                tracker.add(a)
            for key in MOMENTS:
                for a in loop_p:
                    if key in loop.state[a]:
                        tracker.add(loop.state[a][key])
            for b in impl_p:
                tracker.pop_check_set(b, self)
            for key in MOMENTS:
                for b in impl_p:
                    if key in impl.state[b]:
                        tracker.pop_check_set(impl.state[b][key], self)
            self.assertTrue(tracker.all_popped())
            for a, b in zip(loop_p, impl_p):
                self._same(impl.isolation_mask(b), loop.isolation_mask(a), msg=f"mask, step {t}")

        for inp in optim_info.optim_inputs_func(device, dtype):
            with self.subTest(desc=inp.desc):
                self._impl_pair(device, dtype, inp.kwargs, "fused", compare)


instantiate_device_type_tests(
    TestEPIOptimGeneric, globals(), only_for=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
if "TestEPIOptimGenericCUDA" in globals():  # instantiated only where there is a CUDA device
    globals()["TestEPIOptimGenericCUDA"].pytestmark = [pytest.mark.gpu]
