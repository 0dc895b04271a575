"""Host time per optimizer step of a kernel backend over many small tensors: the Python and torch
work around the kernels (launch groups, tables, scalars, refresh bookkeeping), which sets the step
time of a model with hundreds of small tensors when the device is fast.

Runs the "cuda" backend on CPU tensors (EPI_CUDA_HOST=1) with every kernel launch replaced by a
call that does nothing (--stub, the default; --no-stub runs the extension's host harness, whose
emulated kernels then take part of the time), so what is timed is the host's work alone. Next to
it, torch.optim.AdamW(fused=True) stepping the same list of CPU tensors: torch's host path (its
dispatch and per-tensor loop; its arithmetic on 64-element tensors is a small part of it). Prints
the median and spread of the wall time per step over repeated blocks of steps, interleaved, for a
plain step, the average over a refresh cycle (refresh_interval=4: collect, refresh, two plain
steps) and a capturable step (decided on the device) over the same cycle, each with its ratio to
torch's fused AdamW.

    EPI_CUDA_HOST=1 python bench/host_time.py [--tensors 300] [--steps 200] [--repeats 7] [--no-stub]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import types

os.environ.setdefault("EPI_CUDA_HOST", "1")

import torch  # noqa: E402

from epi_kernels import EPIAdamW  # noqa: E402


@contextlib.contextmanager
def stubbed_launches():
    """The host harness's launch functions replaced by ones that return at once."""
    from epi_kernels.kernel_sets import cuda_kernels  # noqa: PLC0415 - needs the extension

    real = cuda_kernels.HOST_KERNELS.ops
    names = ("fused_step", "window_histogram", "window_select", "radix_repair")
    cuda_kernels.HOST_KERNELS.ops = types.SimpleNamespace(**{n: (lambda *args: None) for n in names})
    try:
        yield
    finally:
        cuda_kernels.HOST_KERNELS.ops = real


def optimizers(tensors: int) -> dict[str, torch.optim.Optimizer]:
    """The contenders, each over its own `tensors` 64-element parameters with gradients."""
    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    epi = dict(backend="cuda", isolation_ratio=0.1, warmup_steps=1)
    return {"AdamW fused": torch.optim.AdamW(params(), fused=True),
            "EPI plain step": EPIAdamW(params(), refresh_interval=10**9, **epi),
            "EPI refresh cycle": EPIAdamW(params(), refresh_interval=4, **epi),
            "EPI capturable": EPIAdamW(params(), refresh_interval=4, capturable=True, **epi)}


def per_step_ms(opts: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    for opt in opts.values():
        for _ in range(8):  # state, first refreshes, cached tables
            opt.step()
    out = {name: [] for name in opts}
    for _ in range(repeats):  # interleaved blocks: the ratios share the machine's drift
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            out[name].append((time.perf_counter() - t0) / steps * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-stub", action="store_true", help="run the emulated kernels instead of skipping them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with contextlib.nullcontext() if args.no_stub else stubbed_launches():
        ms = per_step_ms(optimizers(args.tensors), args.steps, args.repeats)
    base = ms["AdamW fused"]
    print(f"{args.tensors} tensors, {args.repeats} blocks of {args.steps} steps, kernel launches "
          f"{'emulated' if args.no_stub else 'stubbed'}; ms per step:")
    for name, times in ms.items():
        ratios = sorted(a / b for a, b in zip(times, base))
        print(f"{name:18s} median {statistics.median(times):7.3f} (min {min(times):.3f}, max {max(times):.3f})"
              f"   x AdamW fused: {statistics.median(ratios):.2f} ({ratios[0]:.2f}..{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
