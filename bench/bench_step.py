"""pytest-benchmark: one optimizer step, EPIAdamW backends against torch.optim.AdamW and the unfused
hand-written EPI step. Run: python -m pytest bench/bench_step.py (see bench/README.md)."""
import pytest
import torch

from bench import common

KINDS = [f"epi-{b}" for b in common.runnable_backends("cpu")] + ["unfused", "adamw-fused", "adamw-foreach"]
CASES = [common.flat(common.MiB, "1M"), common.model_mix(4_000_000)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("refresh", [False, True], ids=["normal", "refresh"])
@pytest.mark.parametrize("kind", KINDS)
def test_step(benchmark, kind, refresh, dtype, case):
    opt = common.contender(kind, common.make_params(case, dtype, "cpu"), refresh)
    benchmark.group = f"step {case.name} {dtype} {'refresh' if refresh else 'normal'}"
    benchmark.extra_info["bytes_per_element"] = common.bytes_per_element(
        dtype, None if kind.startswith("adamw") else torch.float32)
    benchmark.pedantic(opt.step, rounds=5, iterations=1, warmup_rounds=3)
