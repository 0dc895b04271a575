"""Checkpoints saved by an earlier version load and resume exactly as that version went on
(tests/support/legacy_checkpoint.py wrote the file, on main at 24d7e35, before the optimizer was
split into settings, schedule, group records, layouts and registered backends)."""
import pathlib

import pytest
import torch

from support import legacy_checkpoint as legacy
from support.devices import CPU_KERNEL_BACKENDS

FILE = pathlib.Path(__file__).resolve().parents[1] / "support" / "data" / "main-24d7e35-checkpoint.pt"
MARKS = {p.values[0]: p.marks for p in CPU_KERNEL_BACKENDS}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@pytest.mark.parametrize("index", [pytest.param(i, id=f"{c[0]}-{i}", marks=MARKS.get(c[0], ()))
                                   for i, c in enumerate(legacy.CASES)])
def test_a_checkpoint_of_main_resumes_as_main_went_on(index):
    recorded = torch.load(FILE, weights_only=True)["cases"][index]
    backend, kwargs, second = legacy.CASES[index]
    params = [torch.nn.Parameter(t.clone()) for t in recorded["saved"]["params"]]
    opt = legacy.optimizer(params, backend, kwargs, second)
    opt.load_state_dict(recorded["saved"]["optimizer"])
    for t, expected in zip(range(legacy.SAVE_AT, legacy.SAVE_AT + legacy.RESUME_STEPS), recorded["after"]):
        legacy.step(opt, params, t)
        got = legacy.record(opt, params)
        for key in ("params", "masks"):
            assert all(_same(a, b) for a, b in zip(got[key], expected[key])), (t, key)
        assert len(got["stats"]) == len(expected["stats"])
        for a, b in zip(got["stats"], expected["stats"]):
            assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), (t, a, b)
    assert any(bool(m.any()) for m in got["masks"])  # the run isolated something
