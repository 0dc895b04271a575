"""Peak memory of a plain step and of refresh steps, next to torch.optim.AdamW's.

One fresh process per configuration (so no allocator state carries over), one fp32 tensor of
`--numel` elements with a gradient. Step 1 allocates the optimizer state; the steady state is
measured after it. Then the peak *above the steady state* during step 2 (plain; on the kernel
backends it also collects the histograms for step 3), step 3 (the first refresh: no previous
threshold, so the repair path) and step 6 (a refresh the window answers), and a plain step 4.

CPU: resident set size sampled every 0.2 ms by a thread while the step runs (glibc's mmap
threshold is pinned so that freed buffers go back to the system and the RSS falls again).
CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact, the caching
allocator's view).

    python bench/memory.py                      # CPU: adamw, torch (approx, exact)
    python bench/memory.py --device cuda --configs adamw,triton,cuda,torch --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

CONFIGS = {
    "adamw": {},
    "torch": dict(backend="torch"),
    "torch-exact": dict(backend="torch", threshold="exact"),
    "compiled": dict(backend="compiled"),
    "triton": dict(backend="triton"),
    "cuda": dict(backend="cuda"),
}
STEPS = {"plain (step 2)": 2, "refresh, repair path (step 3)": 3, "plain (step 4)": 4,
         "refresh, window path (step 6)": 6}


class _RssPeak:
    """Peak resident set size while the block runs, sampled by a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def _child(config: str, numel: int, device: str) -> dict:
    import torch

    from epi_kernels import EPIAdamW

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, device=device))
    grads = [torch.randn(numel, device=device) * (1 + i) for i in range(2)]  # changing gradients
    kw = CONFIGS[config]
    opt = (torch.optim.AdamW([p], lr=1e-3) if config == "adamw" else
           EPIAdamW([p], lr=1e-3, isolation_ratio=0.01, refresh_interval=3, **kw))
    cuda = device == "cuda"

    def used() -> int:
        return torch.cuda.memory_allocated() if cuda else _RssPeak().rss()

    p.grad = grads[0]
    opt.step()  # allocates the state
    if cuda:
        torch.cuda.synchronize()
    steady = used()
    out = {"config": config, "numel": numel, "device": device, "steady_bytes": steady, "peaks": {}, "seconds": {}}
    for step in range(2, 7):
        p.grad = grads[step % 2]
        start = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with _RssPeak() as meter:
                opt.step()
            peak = meter.peak
        for name, s in STEPS.items():
            if s == step:
                out["peaks"][name] = peak - steady
                out["seconds"][name] = time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="adamw,torch,torch-exact")
    ap.add_argument("--out", default=None, help="folder for memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.numel, args.device)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the RSS
    rows = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", config, "--numel", str(args.numel), "--device", args.device]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{config}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    n = args.numel
    print(f"peak memory above the steady state, {n / 1e6:.0f}M fp32 elements on {args.device} "
          f"(MB, and bytes per element; steady state = params + grads + optimizer state)")
    print("| config | steady state | " + " | ".join(STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for r in rows:
        cells = [f"{r['peaks'][s] / 1e6:.0f} MB ({r['peaks'][s] / n:.1f} B, {r['seconds'][s]:.2f} s)" for s in STEPS]
        print(f"| {r['config']} | {r['steady_bytes'] / 1e6:.0f} MB | " + " | ".join(cells) + " |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
