"""Checkpoints: bit-exact resume, dtypes kept on load, weights_only loading, AdamW state dicts."""
import io
import re

import pytest
import torch

from epi_kernels import EPIAdamW

EPI = dict(lr=1e-2, isolation_ratio=0.1, refresh_interval=3, importance_beta=0.9)


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def train(m, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g).to(next(m.parameters()).dtype)
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()


def round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a, b):
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]) or (sa[key].isnan().all() and sb[key].isnan().all()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"scope": "global"}, {"importance_dtype": torch.bfloat16},
                                {"importance": "exp_avg_sq", "importance_beta": None}])
def test_resume_is_bit_exact_across_refreshes(dtype, kw):
    m1 = model(dtype)
    o1 = EPIAdamW(m1.parameters(), **{**EPI, **kw})
    train(m1, o1, 5, seed=1)  # refresh at step 3; the next at 6 happens after the resume
    m2 = model(dtype, seed=99)
    m2.load_state_dict(m1.state_dict())
    o2 = EPIAdamW(m2.parameters(), **{**EPI, **kw})
    o2.load_state_dict(round_trip(o1.state_dict()))
    assert_same_state(o1, o2)
    train(m1, o1, 5, seed=2)
    train(m2, o2, 5, seed=2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert_same_state(o1, o2)
    assert [s["refresh_step"] for s in o2.isolation_stats()] == [9] * 4


def test_load_keeps_epi_dtypes_with_bf16_params():
    m = model(torch.bfloat16)
    o = EPIAdamW(m.parameters(), **EPI)
    train(m, o, 4, seed=3)
    fresh = EPIAdamW(m.parameters(), **EPI)
    fresh.load_state_dict(round_trip(o.state_dict()))
    st = fresh.state[next(m.parameters())]
    assert st["importance"].dtype == torch.float32  # torch's loader would make this bf16
    assert st["isolation_mask"].dtype == torch.uint8
    assert st["threshold_bits"].dtype == torch.int32
    assert st["exp_avg"].dtype == torch.bfloat16  # AdamW's moments follow the param, as in torch
    assert torch.equal(st["importance"], o.state[next(m.parameters())]["importance"])
    assert st["threshold_bits"].item() == o.state[next(m.parameters())]["threshold_bits"].item()


def test_state_dict_has_only_weights_only_safe_types():
    m = model()
    o = EPIAdamW(m.parameters(), **EPI)
    train(m, o, 4, seed=4)
    loaded = round_trip(o.state_dict())  # raises UnpicklingError on numpy scalars, enums, ...
    assert loaded["param_groups"][0]["importance_dtype"] == torch.float32
    assert loaded["param_groups"][0]["epi_step"] == 4


def test_adamw_state_dict_loads_with_zero_scores_and_continues_like_adamw():
    m1, m2 = model(), model()
    adamw = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    train(m1, adamw, 4, seed=5)
    m2.load_state_dict(m1.state_dict())
    epi = EPIAdamW(m2.parameters(), lr=1e-2, isolation_ratio=0.0)
    epi.load_state_dict(round_trip(adamw.state_dict()))
    train(m1, adamw, 3, seed=6)
    train(m2, epi, 3, seed=6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        assert epi.state[p2]["step"].item() == 7
    assert epi.param_groups[0]["isolation_ratio"] == 0.0 and epi.param_groups[0]["epi_step"] == 3


def test_adamw_state_dict_into_isolating_optimizer_starts_scores_at_zero():
    m = model()
    adamw = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, adamw, 2, seed=7)
    epi = EPIAdamW(m.parameters(), **EPI)
    epi.load_state_dict(adamw.state_dict())
    x = torch.randn(8, 12)
    epi.zero_grad()
    m(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    epi.step()
    for p, g in zip(m.parameters(), grads):
        assert torch.equal(epi.state[p]["importance"], (1 - 0.9) * g * g)  # from zero, not from AdamW
        assert epi.state[p]["step"].item() == 3


def test_bad_checkpoint_is_rejected_before_anything_loads():
    m = model()
    o = EPIAdamW(m.parameters(), **EPI)
    train(m, o, 3, seed=8)
    sd = o.state_dict()
    before = {k: v.clone() for k, v in o.state[next(m.parameters())].items()}
    bad = round_trip(sd)
    bad["state"][0]["importance"] = torch.zeros(3)
    with pytest.raises(ValueError, match="importance"):
        o.load_state_dict(bad)
    bad = round_trip(sd)
    bad["state"][0]["isolation_mask"] = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="isolation_mask"):
        o.load_state_dict(bad)
    for k, v in o.state[next(m.parameters())].items():
        assert torch.equal(v, before[k]) or v.isnan().all(), k


def test_isolation_index_cache_is_rebuilt_after_load():
    m1, m2 = model(), model()
    o1 = EPIAdamW(m1.parameters(), **EPI)
    train(m1, o1, 4, seed=9)
    o2 = EPIAdamW(m2.parameters(), **EPI)
    train(m2, o2, 4, seed=10)  # different masks cached in o2
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(o1.state_dict())
    before = [p.detach().clone() for p in m2.parameters()]
    train(m2, o2, 1, seed=11)  # step 5: no refresh, so o1's masks must be the ones applied
    assert sum(int(o1.isolation_mask(q).sum()) for q in m1.parameters()) == 19 + 1 + 6 + 0  # k per tensor
    for p, b, q in zip(m2.parameters(), before, m1.parameters()):
        assert torch.equal(p == b, o1.isolation_mask(q))


def _trained_and_saved():
    m = model()
    o = EPIAdamW(m.parameters(), **EPI)
    train(m, o, 4, seed=12)
    return m, o, round_trip(o.state_dict())


@pytest.mark.parametrize("key,value", [("backend", "gpu"), ("isolation_ratio", 1.5), ("refresh_interval", 0),
                                       ("epi_step", "5"), ("epi_step", -1), ("epi_step", torch.tensor(2.0)),
                                       ("importance_dtype", torch.float16), ("scope", "layer"),
                                       ("importance_beta", float("nan")), ("lr", -1.0)])
def test_invalid_loaded_group_is_rejected_before_anything_loads(key, value):
    from test_settings import snapshot

    m, o, sd = _trained_and_saved()
    sd["param_groups"][0][key] = value
    before = snapshot(o, list(m.parameters()))
    name = "learning rate" if key == "lr" else key
    with pytest.raises(ValueError, match=f"Invalid {name}: .* in loaded param group 0"):
        o.load_state_dict(sd)
    assert snapshot(o, list(m.parameters())) == before


@pytest.mark.parametrize("key,value,expected", [
    ("threshold_bits", torch.zeros(3, dtype=torch.int32), "torch.int32"),
    ("threshold_bits", torch.tensor(0.0), "torch.int32"),
    ("isolated_count", torch.tensor(5.0), "torch.int64"),
    ("isolation_k", torch.tensor(5, dtype=torch.int32), "torch.int64"),
    ("refresh_step", torch.tensor([3]), "torch.int64"),
    ("threshold_exact", torch.tensor(0, dtype=torch.uint8), "torch.bool"),
    ("isolation_overlap", torch.tensor(1), "torch.float32"),
])
def test_loaded_scalar_epi_entries_must_be_0_dim_of_their_dtype(key, value, expected):
    from test_settings import snapshot

    m, o, sd = _trained_and_saved()
    sd["state"][2][key] = value
    before = snapshot(o, list(m.parameters()))
    found = f"found {value.dtype} of shape {tuple(value.shape)}"
    with pytest.raises(ValueError, match=rf"parameter 2: '{key}' must be a 0-dim {expected} tensor, {re.escape(found)}"):
        o.load_state_dict(sd)
    assert snapshot(o, list(m.parameters())) == before


def test_numpy_values_in_a_loaded_group_load_as_python_numbers():
    import numpy as np

    m, o, sd = _trained_and_saved()
    group = sd["param_groups"][0]
    group.update(isolation_ratio=np.float64(0.1), refresh_interval=np.int64(3), epi_step=np.int32(4),
                 betas=[np.float32(0.5), 0.999])
    m2 = model()
    m2.load_state_dict(m.state_dict())
    o2 = EPIAdamW(m2.parameters(), **EPI)
    o2.load_state_dict(sd)
    g = o2.param_groups[0]
    assert (type(g["isolation_ratio"]), type(g["refresh_interval"]), type(g["epi_step"])) == (float, int, int)
    assert g["betas"] == (0.5, 0.999) and type(g["betas"]) is tuple
    round_trip(o2.state_dict())  # weights_only: no numpy scalar left
    o.param_groups[0]["betas"] = (0.5, 0.999)
    train(m, o, 3, seed=13)
    train(m2, o2, 3, seed=13)
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_checkpoint_with_float64_overlap_and_tensor_step_counter_loads():
    # a float64 overlap: saved while torch's default dtype was float64; a tensor epi_step: saved
    # after capturable steps (the counter then lives on the device)
    _, _, sd = _trained_and_saved()
    for st in sd["state"].values():
        st["isolation_overlap"] = st["isolation_overlap"].double()
    sd["param_groups"][0]["epi_step"] = torch.tensor(4)
    o2 = EPIAdamW(model().parameters(), **EPI)
    o2.load_state_dict(sd)
    assert o2.state[next(iter(o2.state))]["isolation_overlap"].dtype == torch.float64
    assert int(o2.param_groups[0]["epi_step"]) == 4
