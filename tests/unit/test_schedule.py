"""The refresh schedule against the rule as README and DESIGN.md ("The schedule") state it, for
every setting: host-decided steps (is_refresh_step) and capturable ones (refresh_due, on a device
counter) agree with it and with each other."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epi_kernels.schedule import is_refresh_step, refresh_due


def documented_refresh_steps(steps: int, interval: int, warmup: int | None, static: bool) -> list[int]:
    """refresh(t): t >= w and (t - w) % interval == 0 (w = warmup, or interval when None), steps
    counted from 1; with static only the first such t."""
    w = interval if warmup is None else warmup
    due = [t for t in range(1, steps + 1) if t >= w and (t - w) % interval == 0]
    return due[:1] if static else due


@settings(max_examples=300, deadline=None)
@given(interval=st.integers(1, 9), warmup=st.none() | st.integers(0, 12), static=st.booleans())
def test_host_and_device_schedules_follow_the_documented_rule(interval, warmup, static):
    steps = 40
    expected = documented_refresh_steps(steps, interval, warmup, static)
    assert [t for t in range(1, steps + 1) if is_refresh_step(t, interval, warmup, static)] == expected
    counters = torch.arange(1, steps + 1)
    on_device = refresh_due(counters, interval, warmup, static)
    assert counters[on_device].tolist() == expected


def test_static_without_warmup_refreshes_once_at_the_first_interval():
    # warmup 0: t - 0 is never 0 for t >= 1, so the first refresh is at t = interval
    assert [t for t in range(1, 13) if is_refresh_step(t, 5, 0, True)] == [5]
    assert [t for t in range(1, 13) if is_refresh_step(t, 1, 0, True)] == [1]
