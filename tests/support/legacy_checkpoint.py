"""Checkpoints written by an earlier version of the package, and what it did after resuming from them.

`python tests/support/legacy_checkpoint.py OUT` (run on a checkout of that version, with this file
copied in) steps each of CASES for SAVE_AT steps, saves the optimizer's state_dict, then steps on
for RESUME_STEPS more steps and records the parameters, masks and isolation stats after each.
tests/integrations/test_legacy_checkpoint.py loads the state dict into today's EPIAdamW, steps with the
same gradients and compares with what the earlier version recorded, bit for bit.
"""
from __future__ import annotations

import copy
import os
import sys

import torch

SAVE_AT, RESUME_STEPS = 5, 5
SHAPES = ((37, 11), (300,), (5,), (64, 3))
# (backend, EPIAdamW arguments, arguments of the second param group)
CASES = (
    ("torch", dict(isolation_ratio=0.2, refresh_interval=2, warmup_steps=1), dict(lr=3e-3)),
    ("torch", dict(isolation_ratio=0.1, refresh_interval=3, importance="abs", amsgrad=True,
                   importance_dtype=torch.bfloat16), dict(importance="exp_avg_sq", importance_beta=None,
                                                         importance_dtype=None)),
    ("cuda", dict(isolation_ratio=0.2, refresh_interval=2, warmup_steps=1), dict(lr=3e-3)),
    ("cuda", dict(isolation_ratio=0.2, refresh_interval=2, warmup_steps=1, capturable=True), dict(weight_decay=0.1)),
    ("triton", dict(isolation_ratio=0.2, refresh_interval=2, warmup_steps=1, maximize=True), dict(lr=3e-3)),
)


def initial_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * 10 ** torch.randint(-3, 3, s, generator=g).float() for s in SHAPES]


def gradients(step: int) -> list[torch.Tensor]:
    """Gradients of mixed magnitudes (eight decades) for step `step` (from 0)."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * 10 ** torch.randint(-5, 3, s, generator=g).float() for s in SHAPES]


def optimizer(params, backend: str, kwargs: dict, second: dict):
    from epi_kernels import EPIAdamW  # noqa: PLC0415 - the version under test (or the one recording)

    return EPIAdamW([{"params": params[:2]}, {"params": params[2:], **second}], lr=1e-2, backend=backend, **kwargs)


def step(opt, params, t: int) -> None:
    for p, g in zip(params, gradients(t)):
        p.grad = g
    if t == SAVE_AT + 1:
        params[2].grad = None  # a tensor without a gradient in a step
        opt.request_refresh()
    opt.step()


def record(opt, params) -> dict:
    return {"params": [p.detach().clone() for p in params], "masks": [opt.isolation_mask(p).clone() for p in params],
            "stats": opt.isolation_stats()}


def main(out: str) -> None:
    cases = []
    for backend, kwargs, second in CASES:
        params = [torch.nn.Parameter(t) for t in initial_params()]
        opt = optimizer(params, backend, kwargs, second)
        for t in range(SAVE_AT):
            step(opt, params, t)
        saved = {"params": [p.detach().clone() for p in params], "optimizer": copy.deepcopy(opt.state_dict())}
        after = []
        for t in range(SAVE_AT, SAVE_AT + RESUME_STEPS):
            step(opt, params, t)
            after.append(record(opt, params))
        cases.append({"saved": saved, "after": after})
    import epi_kernels  # noqa: PLC0415

    torch.save({"version": epi_kernels.__version__, "cases": cases}, out)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EPI_CUDA_HOST", "1")
    main(sys.argv[1])
