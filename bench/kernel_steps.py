"""A kernel backend's step variants side by side ("triton" or "cuda"): what the histogram and
the refresh cost on top of the plain fused step (README target: histogram + threshold selection
<= 5 % of the step).

    plain     the fused step alone (mask read, no histogram): a normal step
    histogram the step before a refresh: the same pass also counts the new scores
    refresh   a refresh step: window select (one program per tensor), the repair kernels launched
              with nothing flagged, and the fused step writing the new mask
    repair    a refresh whose window misses for every tensor: three radix passes over the scores
    device    a plain step decided on the device (capturable=True): what deciding on the device
              costs (select launched with the repair path gated off, gated stores)
    graph     the same step captured once in a CUDA graph and replayed (CUDA only): no host work
"""
from __future__ import annotations

from typing import Callable

import torch

from epi_kernels import EPIAdamW
from epi_kernels.step_driver import RefreshPlan, kernel_step
from epi_kernels.step_records import StepHyper, StepTensors
from epi_kernels.threshold import KEY_NONE

RATIO = 0.01


def step_variants(params: list[torch.nn.Parameter], backend: str) -> dict[str, Callable[[], None]]:
    """Callables for each variant over `params` (with gradients), sharing one optimizer state."""
    opt = EPIAdamW(params, backend=backend, isolation_ratio=RATIO, refresh_interval=1, warmup_steps=1)
    for _ in range(3):  # state, then real scores, then a threshold from real scores
        opt.step()
    hyper = StepHyper.of(opt.param_groups[0])
    states = [opt.state[p] for p in params]
    tensors = StepTensors.of(params, states, hyper, lambda t: t)
    collected: dict = {}

    def fused_step(plan: RefreshPlan) -> None:
        kernel_step(backend, tensors, hyper, plan)

    def run(refresh: bool, collect: bool, pending: dict | None = None) -> None:
        # handed the collected histograms (of the same score tensors), this refresh uses them
        plan = RefreshPlan(states, RATIO, refresh, collect, dict(pending or {}))
        fused_step(plan)
        if collect and not collected:
            collected.update(plan.histograms)

    def repair() -> None:
        for st in states:
            st["threshold_bits"].fill_(KEY_NONE)  # no window: every tensor takes the repair path
        run(True, False)

    control = torch.zeros(3, dtype=torch.int32, device=params[0].device)  # no refresh, no collect, no skip
    buffers: dict = {}

    def device() -> None:
        fused_step(RefreshPlan(states, RATIO, True, True, buffers, control))

    run(False, True)  # fills `collected`
    variants = {"plain": lambda: run(False, False), "histogram": lambda: run(False, True),
                "refresh": lambda: run(True, False, collected), "repair": repair, "device": device}
    if params[0].is_cuda:
        variants["graph"] = _captured(device)
    return variants


def _captured(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (after warm-up calls on a side stream), as its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
