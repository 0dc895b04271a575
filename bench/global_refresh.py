"""What scope="global" costs: a refresh step with one selection over the group against a refresh step
with one per tensor, per backend, on a model's tensor mix.

Two EPIAdamW per backend over identical parameters and gradients, refresh_interval=1 (every step a
refresh, the window answering from the previous one), isolation_ratio 0.01, timed interleaved
(tensor, global, tensor, global, ...) after 3 warm-up steps, so the ratio shares the machine's noise.
A plain step (no refresh) of the per-tensor optimizer is timed alongside for scale.

    python bench/global_refresh.py                         # llama-27M, the backends this machine runs
    python bench/global_refresh.py --cases 7x-25M,llama-27M --backends torch,compiled --reps 9
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from epi_kernels import EPIAdamW  # noqa: E402

CASES = {"llama-27M": common.llama_mix, "7x-25M": common.seven_tensors, "mix-25M": common.model_mix}


def _optimizer(case, backend: str, device: str, scope: str, refresh: bool) -> EPIAdamW:
    schedule = dict(refresh_interval=1, warmup_steps=1) if refresh else dict(refresh_interval=10**9, warmup_steps=2)
    params = common.make_params(case, torch.float32, device)
    return EPIAdamW(params, isolation_ratio=0.01, backend=backend, scope=scope, **schedule)


def bench(case, backend: str, device: str, reps: int) -> dict:
    opts = {"tensor": _optimizer(case, backend, device, "tensor", True),
            "global": _optimizer(case, backend, device, "global", True),
            "plain": _optimizer(case, backend, device, "tensor", False)}
    for opt in opts.values():  # compile, state, the first refresh (the radix select)
        for _ in range(3):
            opt.step()
    times = {k: [] for k in opts}
    for _ in range(reps):
        for k, opt in opts.items():
            times[k].append(common.timed(opt.step, device))
    return {"case": case.name, "numel": case.numel, "tensors": len(case.shapes), "backend": backend,
            "threads": torch.get_num_threads(), **{f"{k}_refresh" if k != "plain" else "plain": common.summary(v)
                                                   for k, v in times.items()},
            "global_vs_tensor": common.ratio_summary(times["global"], times["tensor"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--cases", default="llama-27M")
    ap.add_argument("--backends", default=",".join(common.runnable_backends(device)))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args()
    rows = []
    print("| case | backend | threads | plain step ms | tensor refresh ms | global refresh ms | global / tensor |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        for backend in args.backends.split(","):
            r = bench(CASES[name](), backend, device, args.reps)
            rows.append(r)
            ratio = r["global_vs_tensor"]
            print(f"| {name} | {backend} | {r['threads']} | {r['plain']['median_ms']:.1f} | "
                  f"{r['tensor_refresh']['median_ms']:.1f} | {r['global_refresh']['median_ms']:.1f} | "
                  f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) |", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"machine": common.machine_info(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
