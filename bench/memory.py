"""Peak memory of plain steps and of refresh steps, as users run them (default malloc settings).

One fresh process per measurement (so no allocator state carries over), `--repeats` processes per
configuration, medians reported. A process makes the parameters and two sets of gradients (they
alternate, so the scores change), warms up (below), hands the C heap's free pages back (glibc
malloc_trim, so that every configuration and version of the code starts alike) and notes its
resident set size (RSS): the *start*.
Then it creates the optimizer and runs 7 steps with refresh_interval=3: steps 1-2 plain (step 1
allocates the state), step 3 the first refresh (no previous threshold: the radix select), steps
4-5 plain, step 6 a refresh the window answers, step 7 plain. Per step: the peak RSS above the
start (sampled every 0.2 ms by a thread while the step runs) and the RSS after it.

Reported per parameter (B/param):

* plain: the peak of steps 1-2 (state + a plain step's temporaries, before any refresh);
* refresh: the peak of steps 3 and 6;
* after: the peak of the plain steps after a refresh (4, 5, 7): what a refresh left resident;
* delta: max(refresh, after) - plain, what refreshes add to the process's peak.

Malloc as users run it: glibc's defaults. Its mmap threshold then rises to the size of any freed
mmapped block (up to 32 MiB), after which blocks below it come from the heap, where freed memory
stays resident (it is reused, but returned only from the heap's top). `--pinned` adds the same
runs with MALLOC_MMAP_THRESHOLD_=131072 (the threshold fixed at 128 KiB, so freed blocks go back
to the system at once: the temporaries' own size, without the heap's), in columns of their own.

Warm-up: a throwaway optimizer with the same settings steps a 4096-element tensor through two
refreshes before the start, so backend="compiled" has compiled its refresh functions (the shape-
generic ones, the only ones a refresh uses: threshold.SLICE < compiled.STATIC_NUMEL); the RSS that
took is reported as "warm-up MB" (a one-off, whatever the model's size; negative where the
warm-up's refresh handed free heap pages back, refresh.release_heap). The step kernel of each
tensor of >= 1M elements is compiled for its size at step 1, and counts in "plain".

CUDA (`--device cuda`): torch.cuda.max_memory_allocated above memory_allocated at the start (exact,
the caching allocator's view); the malloc settings do not apply.

    python bench/memory.py                                   # CPU: the whole matrix below, 3 repeats (~10 min on 2 cores)
    python bench/memory.py --configs torch --shapes 20M --repeats 1 --pinned
    python bench/memory.py --device cuda --configs adamw,triton,cuda,torch --out DIR

Configs: adamw (torch.optim.AdamW, for reference), torch, torch-exact (threshold="exact"), compiled,
triton, cuda; `--importance sq,exp_avg_sq`, `--scope tensor,global`, `--shapes 20M,mix` (a flat
fp32 tensor of 20M elements; a small transformer's 47 tensors, 19.9M parameters, bench/common.py
model_mix), or `--numel N` for one flat tensor of N elements. Without options on the CPU: the
matrix adamw,torch,compiled x sq,exp_avg_sq x tensor,global x 20M,mix, 3 processes each; on CUDA
or with --numel: adamw,torch x sq x tensor, 1 process each (bench/device_check.sh runs these).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

CONFIGS = {
    "adamw": {},
    "torch": dict(backend="torch"),
    "torch-exact": dict(backend="torch", threshold="exact"),
    "compiled": dict(backend="compiled"),
    "triton": dict(backend="triton"),
    "cuda": dict(backend="cuda"),
}
STEPS = 7
PLAIN, REFRESH, AFTER = (1, 2), (3, 6), (4, 5, 7)
PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class _RssPeak:
    """Peak resident set size while the block runs, sampled by a thread."""

    page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.page

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


def _trim_heap() -> None:
    """Hand the C heap's free pages back before the start (glibc malloc_trim; nothing elsewhere):
    what making the tensors and the warm-up freed would otherwise be resident or not depending on
    the code that ran (refresh.release_heap trims, older versions did not)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass


def _shapes(shape: str, numel: int | None) -> list[tuple[int, ...]]:
    if numel is not None:
        return [(numel,)]
    if shape == "20M":
        return [(20_000_000,)]
    if shape == "mix":
        from bench.common import model_mix
        return list(model_mix(20_000_000).shapes)
    raise ValueError(f"unknown shape {shape!r}")


def _optimizer(config: str, params, importance: str, scope: str, refresh_interval: int = 3):
    import torch

    from epi_kernels import EPIAdamW

    if config == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    return EPIAdamW(params, lr=1e-3, isolation_ratio=0.01, refresh_interval=refresh_interval,
                    importance=importance, scope=scope, **CONFIGS[config])


def _child(config: str, importance: str, scope: str, shape: str, numel: int | None, device: str) -> dict:
    import torch

    import epi_kernels  # noqa: F401 - imported before the warm-up's RSS is noted

    cuda = device == "cuda"
    torch.manual_seed(0)
    shapes = _shapes(shape, numel)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    grads = [[torch.randn(s, device=device) * (1 + i) for s in shapes] for i in range(2)]  # changing gradients
    n = sum(p.numel() for p in params)

    before_warmup = _RssPeak.rss()
    if config != "adamw":  # compile / first-call work of this configuration, on a tiny tensor
        w = torch.nn.Parameter(torch.randn(4096, device=device))
        wopt = _optimizer(config, [w], importance, scope, refresh_interval=2)
        for i in range(4):
            w.grad = torch.randn(4096, device=device) * (1 + i % 2)
            wopt.step()
        del w, wopt
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
    warmup = 0 if cuda else _RssPeak.rss() - before_warmup
    _trim_heap()  # every configuration (and version of the code) starts from the same clean heap
    start = torch.cuda.memory_allocated() if cuda else _RssPeak.rss()

    opt = _optimizer(config, params, importance, scope)
    peaks, after, seconds = [], [], []
    for step in range(1, STEPS + 1):
        for p, g in zip(params, grads[step % 2]):
            p.grad = g
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - start)
            after.append(torch.cuda.memory_allocated() - start)
        else:
            with _RssPeak() as meter:
                opt.step()
            peaks.append(meter.peak - start)
            after.append(_RssPeak.rss() - start)
        seconds.append(time.perf_counter() - t0)
    return {"numel": n, "tensors": len(params), "warmup_bytes": warmup, "peak_bytes": peaks,
            "resident_bytes": after, "seconds": seconds}


def _summary(runs: list[dict]) -> dict:
    """Medians over the repeats, per step and of the B/param figures (module docstring)."""
    n = runs[0]["numel"]

    def med(key, step):
        return statistics.median(r[key][step - 1] for r in runs)

    def worst(key, steps):
        return statistics.median(max(r[key][s - 1] for s in steps) for r in runs) / n

    plain, refresh, after = worst("peak_bytes", PLAIN), worst("peak_bytes", REFRESH), worst("peak_bytes", AFTER)
    deltas = [(max(r["peak_bytes"][s - 1] for s in REFRESH + AFTER) - max(r["peak_bytes"][s - 1] for s in PLAIN)) / n
              for r in runs]
    return {
        "numel": n, "tensors": runs[0]["tensors"], "repeats": len(runs),
        "plain_B_per_param": plain, "refresh_B_per_param": refresh, "after_B_per_param": after,
        "delta_B_per_param": statistics.median(deltas), "delta_range": [min(deltas), max(deltas)],
        "state_B_per_param": med("resident_bytes", 2) / n,
        "warmup_MB": statistics.median(r["warmup_bytes"] for r in runs) / 1e6,
        "peak_B_per_param_by_step": [med("peak_bytes", s) / n for s in range(1, STEPS + 1)],
        "resident_B_per_param_by_step": [med("resident_bytes", s) / n for s in range(1, STEPS + 1)],
        "seconds_by_step": [med("seconds", s) for s in range(1, STEPS + 1)],
        "runs": runs,
    }


def _run(args, config: str, importance: str, scope: str, shape: str, env: dict) -> dict | None:
    cmd = [sys.executable, __file__, "--child", config, "--importance", importance, "--scope", scope,
           "--shapes", shape, "--device", args.device]
    if args.numel is not None:
        cmd += ["--numel", str(args.numel)]
    runs = []
    for _ in range(args.repeats):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{config} {importance} {scope} {shape}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return _summary(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=None, help="default: adamw,torch,compiled (the matrix); adamw,torch")
    ap.add_argument("--importance", default=None, help="default: sq,exp_avg_sq (the matrix); sq")
    ap.add_argument("--scope", default=None, help="default: tensor,global (the matrix); tensor")
    ap.add_argument("--shapes", default=None, help="default: 20M,mix (the matrix); 20M")
    ap.add_argument("--numel", type=int, default=None, help="one flat tensor of this many elements instead")
    ap.add_argument("--repeats", type=int, default=None, help="processes per configuration (default 3 for the matrix, else 1)")
    ap.add_argument("--pinned", action="store_true", help="also measure with the mmap threshold pinned at 128 KiB")
    ap.add_argument("--out", default=None, help="folder for memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if args.child:
        print(json.dumps(_child(args.child, args.importance, args.scope, args.shapes, args.numel, args.device)))
        return
    matrix = cpu and args.numel is None  # defaults: the whole CPU matrix; on CUDA or with --numel, a quick run
    configs = (args.configs or ("adamw,torch,compiled" if matrix else "adamw,torch")).split(",")
    importances = (args.importance or ("sq,exp_avg_sq" if matrix else "sq")).split(",")
    scopes = (args.scope or ("tensor,global" if matrix else "tensor")).split(",")
    shapes = ["flat"] if args.numel is not None else (args.shapes or ("20M,mix" if matrix else "20M")).split(",")
    args.repeats = args.repeats or (3 if matrix else 1)
    # "default" means glibc's own settings: no malloc tuning inherited from the caller's environment
    default = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    mallocs = {"default": default}
    if args.pinned and cpu:
        mallocs["pinned"] = dict(default, **PINNED)
    rows = []
    for shape, config, importance, scope in itertools.product(shapes, configs, importances, scopes):
        if config == "adamw" and (importance, scope) != (importances[0], scopes[0]):
            continue  # AdamW has neither
        row = {"config": config, "importance": importance if config != "adamw" else None,
               "scope": scope if config != "adamw" else None, "shape": shape, "device": args.device}
        for malloc, env in mallocs.items():
            got = _run(args, config, importance, scope, shape, env)
            if got is not None:
                row[malloc] = got
        if any(m in row for m in mallocs):
            rows.append(row)
            print(_line(row, mallocs), flush=True)
    unit = "B/param above the start (median of %d processes)" % args.repeats
    print(f"\npeak memory, {args.device}, {unit}: plain = steps 1-2, refresh = steps 3 and 6, after = plain steps "
          f"after a refresh, delta = max(refresh, after) - plain")
    head = " | ".join(f"{what} ({m})" for m in mallocs for what in ("plain", "refresh", "after", "delta"))
    print(f"| config | importance | scope | shape | {head} | warm-up MB | s/step: plain, refresh 3 / 6 |")
    print("|---" * (6 + 4 * len(mallocs)) + "|")
    for row in rows:
        print(_line(row, mallocs))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump({"meta": _meta(args), "rows": rows}, f, indent=1)


def _meta(args) -> dict:
    import platform

    import torch

    return {"argv": sys.argv[1:], "torch": torch.__version__, "python": platform.python_version(),
            "libc": " ".join(platform.libc_ver()), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "steps": STEPS, "plain_steps": PLAIN, "refresh_steps": REFRESH,
            "after_steps": AFTER, "pinned_env": PINNED, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _line(row: dict, mallocs: dict) -> str:
    cells = []
    for m in mallocs:
        r = row.get(m)
        if r is None:
            cells += ["failed"] * 4
            continue
        lo, hi = r["delta_range"]
        cells += [f"{r['plain_B_per_param']:.2f}", f"{r['refresh_B_per_param']:.2f}", f"{r['after_B_per_param']:.2f}",
                  f"{r['delta_B_per_param']:+.2f} ({lo:+.2f}..{hi:+.2f})"]
    r = row.get("default") or next(row[m] for m in mallocs if m in row)
    sec = r["seconds_by_step"]
    timing = f"{statistics.median(sec[s - 1] for s in (2, 4, 5, 7)):.2f}, {sec[2]:.2f} / {sec[5]:.2f}"
    return (f"| {row['config']} | {row['importance'] or ''} | {row['scope'] or ''} | {row['shape']} | "
            + " | ".join(cells) + f" | {r['warmup_MB']:.0f} | {timing} |")


if __name__ == "__main__":
    main()
