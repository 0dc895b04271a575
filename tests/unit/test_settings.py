"""Group settings changed between steps (as a scheduler or the user does) are validated by the next
step before anything changes; numpy and other numeric types are accepted and stored as plain
Python numbers (README "API")."""
import copy
import io
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW
from epi_kernels import optimizer as optimizer_module

EPI = dict(lr=1e-2, isolation_ratio=0.2, refresh_interval=2, warmup_steps=2, backend="torch")  # refreshes at 2, 4, ...


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (5,))]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def run(opt, ps, steps, start=0):
    for t in range(start, start + steps):
        set_grads(ps, t)
        opt.step()


def trained(**kw):
    """An optimizer 3 steps in (refreshed at step 2) over two small params, and its params."""
    ps = params()
    opt = EPIAdamW(ps, **{**EPI, **kw})
    run(opt, ps, 3)
    set_grads(ps, 3)
    return opt, ps


def _bits(t):
    return (t.dtype, tuple(t.shape), t.detach().reshape(-1).contiguous().view(torch.uint8).tolist())


def _frozen(x):
    """x with every tensor replaced by its dtype, shape and bytes (NaN == NaN, -0.0 != 0.0)."""
    if torch.is_tensor(x):
        return _bits(x)
    if isinstance(x, dict):
        return {k: _frozen(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_frozen(v) for v in x)
    return x


def snapshot(opt, ps):
    """Everything an error must leave as it was: the optimizer's state and groups (counters
    included, as objects: a normalised value would show) and the params, bit for bit."""
    groups = [{k: (v if k == "params" else (type(v), v)) for k, v in g.items()} for g in opt.param_groups]
    return _frozen(copy.deepcopy(opt.state_dict()["state"])), _frozen(groups), [_bits(p) for p in ps]


# the reproducers and their kin: each ran, or failed mid-step, before step() validated live settings
REPORTED = [("isolation_ratio", 1.5), ("isolation_ratio", -0.5), ("isolation_ratio", float("nan")),
            ("importance_beta", 1.5), ("importance", "sqr"), ("scope", "tensors"), ("refresh_interval", 0),
            ("warmup_steps", -3), ("static", "no"), ("threshold", "fast"), ("importance_dtype", torch.float16),
            ("backend", "gpu"), ("lr", -1.0), ("betas", (0.9, 1.5)), ("eps", float("nan")),
            ("weight_decay", -0.1), ("amsgrad", "yes"), ("maximize", 2)]
MESSAGE = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value", "weight_decay": "Invalid weight_decay value",
           "betas": "Invalid beta"}


def message(name, group):
    return MESSAGE.get(name, f"Invalid {name}") + rf".* in param group {group}$"


@pytest.mark.parametrize("name,value", REPORTED)
def test_setting_changed_between_steps_is_checked_before_anything_changes(name, value):
    ps = params()
    opt = EPIAdamW([{"params": ps[:1]}, {"params": ps[1:]}], **EPI)
    run(opt, ps, 3)
    set_grads(ps, 3)  # step 4 refreshes: with refresh_interval=0 the old code failed after counting it
    opt.param_groups[1][name] = value
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=message(name, 1)):
        opt.step()
    assert snapshot(opt, ps) == before
    assert opt.param_groups[1][name] is value  # not normalised, not reset: the user's to fix


def test_a_valid_change_in_one_group_is_not_stored_when_another_group_is_invalid():
    ps = params()
    opt = EPIAdamW([{"params": ps[:1]}, {"params": ps[1:]}], **EPI)
    run(opt, ps, 3)
    set_grads(ps, 3)
    opt.param_groups[0]["lr"] = np.float32(0.5)
    opt.param_groups[1]["refresh_interval"] = 0
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="Invalid refresh_interval: 0 .* in param group 1"):
        opt.step()
    assert snapshot(opt, ps) == before and type(opt.param_groups[0]["lr"]) is np.float32
    opt.param_groups[1]["refresh_interval"] = 2  # fixed: the step runs and stores plain numbers
    opt.step()
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["epi_step"] == 4


def test_unchanged_settings_are_not_validated_again(monkeypatch):
    ps = params()
    opt = EPIAdamW(ps, **EPI)
    calls = []
    check = optimizer_module.checked_settings
    monkeypatch.setattr(optimizer_module, "checked_settings", lambda *a: calls.append(1) or check(*a))
    run(opt, ps, 3)
    assert calls == []  # validated once, by add_param_group
    opt.param_groups[0]["lr"] = 5e-3  # a scheduler's new value
    run(opt, ps, 3, start=3)
    assert calls == [1]
    opt.param_groups[0]["refresh_interval"] = 2.0  # equal to 2, but a float: still checked
    with pytest.raises(ValueError, match="Invalid refresh_interval: 2.0"):
        opt.step()


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    kw = dict(lr=np.float32(1e-2), betas=(np.float64(0.9), np.float32(0.99)), eps=np.float64(1e-8),
              weight_decay=np.int64(0), isolation_ratio=np.float64(0.2), refresh_interval=np.int64(2),
              warmup_steps=np.int32(2), importance_beta=Fraction(9, 10), static=np.int8(0),
              importance=np.str_("abs"), backend=np.str_("torch"))
    plain = dict(lr=float(np.float32(1e-2)), betas=(0.9, float(np.float32(0.99))), eps=1e-8, weight_decay=0.0,
                 isolation_ratio=0.2, refresh_interval=2, warmup_steps=2, importance_beta=0.9, static=False,
                 importance="abs", backend="torch")
    a, b = params(), params()
    oa, ob = EPIAdamW(a, **kw), EPIAdamW(b, **plain)
    run(oa, a, 5)
    run(ob, b, 5)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    group = oa.param_groups[0]
    for k, v in plain.items():
        assert group[k] == v and type(group[k]) is type(v), k
    assert all(type(b) is float for b in group["betas"])
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)  # plain numbers: loads with weights_only
    buf.seek(0)
    torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------- properties

def _as(types, values):
    """values drawn from `values`, each as one of the numeric `types` (numpy included)."""
    return st.tuples(st.sampled_from(types), values).map(lambda tv: tv[0](tv[1]))


FLOATS = (float, np.float64, np.float32)
INTS = (int, np.int64, np.int32, np.int16)
# values no setting takes, including ones a comparison cannot judge (arrays, complex numbers, tensors
# of several elements or of bools): the error must still name the setting
junk = st.sampled_from([None, "0.1", "1", [0.5], b"x", object(), 1 + 2j, np.array([0.1, 0.2]), np.array([[1]]),
                        torch.tensor(True), torch.tensor([0.1, 0.2]), torch.tensor(1, dtype=torch.int64)])
nonfinite = _as(FLOATS, st.sampled_from([float("nan"), float("inf"), -float("inf")]))
bools = st.booleans()


def _outside_unit():
    return st.one_of(_as(FLOATS, st.floats(min_value=-1e30, max_value=-1e-6)),
                     _as(FLOATS, st.floats(min_value=1.0, max_value=1e30)), nonfinite, bools, junk)


def _bad_count(minimum):
    return st.one_of(_as(INTS, st.integers(min_value=-30000, max_value=minimum - 1)),
                     _as(FLOATS, st.floats(min_value=minimum, max_value=1e6)),  # 2.0 is no count either
                     nonfinite, bools, junk)


def _bad_choice(choices):
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in choices), st.sampled_from(["SQ", " sq", "Torch"]),
                     st.integers(), junk)


def _bad_flag():
    return st.one_of(_as(INTS, st.integers(min_value=2, max_value=30000)),
                     _as(INTS, st.integers(min_value=-30000, max_value=-1)),
                     _as(FLOATS, st.floats(min_value=-1e30, max_value=1e30)), nonfinite, st.text(max_size=4), junk)


def _negative():
    return st.one_of(_as(FLOATS, st.floats(min_value=-1e30, max_value=-1e-9)), _as(FLOATS, st.just(float("nan"))),
                     bools, junk)


def _bad_betas():
    good = st.floats(min_value=0.0, max_value=0.999)
    return st.one_of(st.tuples(_outside_unit(), good), st.tuples(good, _outside_unit()),
                     st.tuples(good), st.tuples(good, good, good), good, junk.filter(lambda v: not isinstance(v, list)))


INVALID = {
    "isolation_ratio": _outside_unit(),
    "importance_beta": _outside_unit().filter(lambda v: v is not None),  # None: the default, 0.99
    "refresh_interval": _bad_count(1), "warmup_steps": _bad_count(0).filter(lambda v: v is not None),
    "importance": _bad_choice(("sq", "abs", "exp_avg_sq")), "scope": _bad_choice(("tensor", "global")),
    "threshold": _bad_choice(("approx", "exact")), "backend": _bad_choice(("auto", "torch", "compiled", "triton", "cuda")),
    "importance_dtype": st.sampled_from([torch.float16, torch.float64, torch.int32, "float32"]),  # None: fp32
    "static": _bad_flag(), "amsgrad": _bad_flag(), "maximize": _bad_flag(),
    "foreach": _bad_flag().filter(lambda v: v is not None), "fused": _bad_flag().filter(lambda v: v is not None),
    "capturable": _bad_flag(), "differentiable": _bad_flag(),
    "lr": _negative(), "eps": _negative(), "weight_decay": _negative(), "betas": _bad_betas(),
}


@pytest.mark.parametrize("name", sorted(INVALID))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_invalid_setting_fails_the_next_step_and_changes_nothing(name, data):
    value = data.draw(INVALID[name], label=name)
    opt, ps = trained()
    opt.param_groups[0][name] = value
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=message(name, 0)):
        opt.step()
    assert snapshot(opt, ps) == before


def _unit(hi):
    return st.floats(min_value=0.0, max_value=hi)


VALID = {  # (values, the numeric types they may come as)
    "isolation_ratio": (_unit(0.5), FLOATS), "importance_beta": (_unit(0.999), FLOATS),
    "lr": (_unit(0.1), FLOATS + INTS[:1]), "eps": (st.floats(1e-10, 1e-6), FLOATS),
    "weight_decay": (_unit(0.1), FLOATS), "refresh_interval": (st.integers(1, 4), INTS),
    "warmup_steps": (st.integers(0, 4), INTS), "static": (st.integers(0, 1), INTS + (bool, np.bool_)),
    "amsgrad": (st.integers(0, 1), INTS + (bool, np.bool_)), "maximize": (st.integers(0, 1), INTS + (bool, np.bool_)),
    "foreach": (st.integers(0, 1), INTS + (bool, np.bool_)), "fused": (st.integers(0, 1), INTS + (bool, np.bool_)),
}
PLAIN = {"refresh_interval": int, "warmup_steps": int, "static": bool, "amsgrad": bool, "maximize": bool,
         "foreach": bool, "fused": bool}


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_valid_numbers_of_any_type_step_like_plain_python_numbers(name, data):
    values, types = VALID[name]
    value = data.draw(values, label="value")
    value = data.draw(st.sampled_from(types), label="type")(value)
    plain = PLAIN.get(name, float)(value)
    (oa, a), (ob, b) = trained(), trained()
    oa.param_groups[0][name] = value
    ob.param_groups[0][name] = plain
    run(oa, a, 2, start=3)  # step 4 refreshes (with the default schedule)
    run(ob, b, 2, start=3)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    got = oa.param_groups[0][name]
    assert got == plain and type(got) is type(plain)


@settings(max_examples=25, deadline=None)
@given(b1=_as(FLOATS, _unit(0.99)), b2=_as(FLOATS, _unit(0.999)), as_list=bools)
def test_valid_betas_of_any_numeric_type_are_stored_as_a_float_pair(b1, b2, as_list):
    (oa, a), (ob, b) = trained(), trained()
    oa.param_groups[0]["betas"] = [b1, b2] if as_list else (b1, b2)
    ob.param_groups[0]["betas"] = (float(b1), float(b2))
    run(oa, a, 2, start=3)
    run(ob, b, 2, start=3)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    betas = oa.param_groups[0]["betas"]
    assert type(betas) is tuple and all(type(x) is float for x in betas)
