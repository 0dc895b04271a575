"""Host time per optimizer step of a kernel backend over many small tensors: the Python and torch
work around the kernels (launch groups, tables, scalars, refresh bookkeeping), which sets the step
time of a model with hundreds of small tensors.

Runs the "cuda" backend in the extension's host harness (CPU tensors, EPI_CUDA_HOST=1) with tensors
so small (64 elements) that the emulated kernels take a small part of the time; prints the median
and spread of the wall time per step over repeated blocks of steps, for a plain step and averaged
over a refresh cycle (refresh_interval=4: collect, refresh, two plain steps), and a capturable
step (decided on the device) over the same cycle.

    EPI_CUDA_HOST=1 python bench/host_time.py [--tensors 300] [--steps 200] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("EPI_CUDA_HOST", "1")

import torch  # noqa: E402

from epi_kernels import EPIAdamW  # noqa: E402


def per_step_ms(tensors: int, steps: int, repeats: int, interval: int, capturable: bool) -> list[float]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = EPIAdamW(params, backend="cuda", isolation_ratio=0.1, refresh_interval=interval, warmup_steps=1,
                   capturable=capturable)
    for _ in range(8):  # state, first refreshes, cached tables
        opt.step()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        out.append((time.perf_counter() - t0) / steps * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, interval, capturable in (("plain step", 10**9, False), ("refresh cycle", 4, False),
                                       ("capturable", 4, True)):
        ms = per_step_ms(args.tensors, args.steps, args.repeats, interval, capturable)
        print(f"{name:14s} {args.tensors} tensors: median {statistics.median(ms):.3f} ms/step "
              f"(min {min(ms):.3f}, max {max(ms):.3f}, {args.repeats} blocks of {args.steps} steps)")


if __name__ == "__main__":
    main()
