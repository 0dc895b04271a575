"""EPIAdamW under DeepSpeed ZeRO next to torch.optim.AdamW under the same ZeRO configuration: time
of `engine.step()` (ZeRO's gradient partitioning, the optimizer step on the flat partitions, the
parameter all-gather) on plain steps and on refresh steps, and the optimizer state per parameter.

Launches itself on `--ranks` CPU processes (gloo, DS_ACCELERATOR=cpu). Each optimizer runs in
`--rounds` interleaved rounds of `--steps` steps (refresh_interval=5, so every fifth EPI step is a
refresh); prints medians with min-max over the rounds' medians, and writes them as JSON.

    python bench/bench_zero.py [--stage 2] [--layers 8] [--width 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

OPTIMIZERS = {"adamw": {}, "epi": dict(importance="sq"), "epi-v": dict(importance="exp_avg_sq")}
INTERVAL = 5


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.GELU())]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(width, 16))


def _engine(name: str, args):
    import deepspeed  # noqa: PLC0415

    from epi_kernels import EPIAdamW  # noqa: PLC0415

    model = _model(args.layers, args.width)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    else:
        opt = EPIAdamW(model.parameters(), lr=1e-4, isolation_ratio=0.05, refresh_interval=INTERVAL,
                       **OPTIMIZERS[name])
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": args.stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def _round(engine, steps: int, width: int, first: int) -> tuple[list[float], list[float]]:
    """Seconds of engine.step() per step, split into plain and refresh steps (EPI's schedule)."""
    import torch.distributed as dist  # noqa: PLC0415

    plain, refresh = [], []
    for i in range(first, first + steps):
        x = torch.randn(16, width, generator=torch.Generator().manual_seed(i))
        engine.backward(engine(x).square().mean())
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        dist.barrier()
        (refresh if (i + 1) >= INTERVAL and (i + 1) % INTERVAL == 0 else plain).append(time.perf_counter() - t0)
    return plain, refresh


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def worker(args) -> None:
    import deepspeed  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    engines = {name: _engine(name, args) for name in OPTIMIZERS}
    numel = sum(p.numel() for p in _model(args.layers, args.width).parameters())
    for name, (engine, _) in engines.items():  # warm-up, and past the first refresh
        _round(engine, INTERVAL + 1, args.width, 0)
    medians = {name: {"plain": [], "refresh": []} for name in OPTIMIZERS}
    for r in range(args.rounds):
        for name, (engine, _) in engines.items():
            plain, refresh = _round(engine, args.steps, args.width, (INTERVAL + 1) + r * args.steps)
            medians[name]["plain"].append(statistics.median(plain))
            if refresh:
                medians[name]["refresh"].append(statistics.median(refresh))
    if dist.get_rank() == 0:
        out = {"stage": args.stage, "ranks": dist.get_world_size(), "params": numel, "rounds": args.rounds,
               "steps": args.steps, "results": {}}
        for name, (_, opt) in engines.items():
            row = {kind: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
                   for kind, v in medians[name].items() if v}
            held = numel if args.stage == 0 else numel / dist.get_world_size()  # stage 0 holds every parameter
            row["state_bytes_per_param_rank0"] = _state_bytes(opt) / held
            out["results"][name] = row
        base = statistics.median(medians["adamw"]["plain"])
        print(f"ZeRO-{args.stage}, {dist.get_world_size()} CPU ranks, {numel / 1e6:.2f}M params; engine.step() "
              f"medians over {args.rounds} rounds x {args.steps} steps (min-max of the round medians)")
        for name, row in out["results"].items():
            text = "  ".join(f"{kind} {v['median_ms']:.1f} ms ({v['min_ms']:.1f}-{v['max_ms']:.1f})"
                             for kind, v in row.items() if isinstance(v, dict))
            print(f"  {name:7s} {text}  plain/AdamW {row['plain']['median_ms'] / (1e3 * base):.2f}x  "
                  f"state {row['state_bytes_per_param_rank0']:.3f} B/param on rank 0")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown after all work is done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
