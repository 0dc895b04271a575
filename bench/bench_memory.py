"""Optimizer-state bytes per parameter (recorded in the benchmark's extra_info; the timing is of one
step, to have something to time)."""
import pytest
import torch

from bench import common
from epi_kernels import EPIAdamW

CASE = common.flat(common.MiB, "1M")
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps),
    "epi-fp32-scores": lambda ps: EPIAdamW(ps, isolation_ratio=0.01, refresh_interval=10**9, warmup_steps=2),
    "epi-bf16-scores": lambda ps: EPIAdamW(ps, isolation_ratio=0.01, refresh_interval=10**9, warmup_steps=2,
                                           importance_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_bytes(benchmark, name, dtype):
    opt = OPTIMIZERS[name](common.make_params(CASE, dtype, "cpu"))
    for _ in range(3):
        opt.step()
    benchmark.extra_info["state_bytes_per_param"] = common.state_bytes_per_param(opt)
    benchmark.group = f"state {dtype}"
    benchmark.pedantic(opt.step, rounds=3, iterations=1)
