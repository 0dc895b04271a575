"""Benchmark runner: step time, GB/s and ratios to torch.optim.AdamW, threshold engine, memory.

    python bench/run.py            # full suite on this machine (CUDA if present, else CPU)
    python bench/run.py --quick    # under a minute on 2 CPU cores
    python -m bench --quick        # the same
    python bench/run.py --dry      # the GPU code paths on CPU (Triton's interpreter, the CUDA
                                   # extension's host harness) at toy sizes: checks the code runs;
                                   # no timings worth reading

Prints a table and writes JSON (machine, versions, git revision, every figure with median and
spread) to bench/results/. Contenders of one row are built on identical tensors and timed
interleaved (A, B, C, A, B, C, ...) in one process, so their ratios share the machine's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import torch

if "--dry" in sys.argv:  # before anything imports Triton: triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["EPI_CUDA_HOST"] = "1"  # the CUDA backend's host harness on CPU tensors
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from epi_kernels import backends as registry  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BASELINES = ("adamw-fused", "adamw-foreach")


def bench_steps(device, cases, dtypes, backends, reps, threads) -> list[dict]:
    rows = []
    for case in cases:
        for dtype in dtypes:
            for refresh in (False, True):
                kinds = [f"epi-{b}" for b in backends] + [f"epi-{b}-v" for b in backends] + ["unfused", *BASELINES]
                opts = {k: common.contender(k, common.make_params(case, dtype, device), refresh) for k in kinds}
                warmup = {}
                for k, opt in opts.items():  # warm-up: compile, caches, the first refresh (step 2)
                    warmup[k] = sum(common.timed(opt.step, device) for _ in range(3))
                times = {k: [] for k in kinds}
                for _ in range(reps):
                    for k, opt in opts.items():
                        times[k].append(common.timed(opt.step, device))
                for k in kinds:
                    score = None if k in BASELINES or k.endswith("-v") else torch.float32
                    nbytes = case.numel * common.bytes_per_element(dtype, score, mask=k not in BASELINES)
                    med = statistics.median(times[k])
                    rows.append({
                        "case": case.name, "numel": case.numel, "tensors": len(case.shapes),
                        "dtype": str(dtype).removeprefix("torch."), "threads": threads,
                        "step": "refresh" if refresh else "normal", "contender": k, **common.summary(times[k]),
                        "warmup_s": warmup[k],  # the first 3 steps: compilation, state, the first refresh
                        "bytes_per_element": nbytes / case.numel, "gb_per_s": nbytes / med / 1e9,
                        **{f"vs_{b}": common.ratio_summary(times[k], times[b]) for b in BASELINES},
                    })
                del opts
    return rows


def bench_kernel_variants(device, cases, dtypes, reps, backends) -> list[dict]:
    """The fused kernel steps with and without histogram / refresh work (bench/kernel_steps.py)."""
    from bench.kernel_steps import step_variants  # noqa: PLC0415 - imports Triton / the extension

    rows = []
    for case, dtype, backend in ((c, d, b) for c in cases for d in dtypes for b in backends):
        fns = step_variants(common.make_params(case, dtype, device), backend)
        for f in fns.values():  # compile every variant
            f()
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, f in fns.items():
                times[name].append(common.timed(f, device))
        for name in fns:
            rows.append({"case": case.name, "numel": case.numel, "tensors": len(case.shapes),
                         "dtype": str(dtype).removeprefix("torch."), "backend": backend, "variant": name,
                         **common.summary(times[name]), "vs_plain": common.ratio_summary(times[name], times["plain"])})
    return rows


def bench_threshold(device, sizes, reps, threads, backends) -> list[dict]:
    """The refresh (keys, histogram threshold, mask, packing, statistics) against exact selectors."""
    rows = []
    for n in sizes:
        fns = common.threshold_contenders(n, device, backends)
        for f in fns.values():
            f()
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, f in fns.items():
                times[name].append(common.timed(f, device))
        ref = "torch.kthvalue" if "torch.kthvalue" in times else "torch.topk"
        for name in fns:
            rows.append({"numel": n, "threads": threads, "what": name, **common.summary(times[name]),
                         f"speedup_vs_{ref}": common.ratio_summary(times[ref], times[name])})
    return rows


def bench_memory(device) -> list[dict]:
    """Optimizer state bytes per parameter after a few steps, against AdamW."""
    case = common.flat(common.MiB, "1M")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        configs = {"AdamW": lambda ps: torch.optim.AdamW(ps),
                   "EPIAdamW, fp32 scores": lambda ps: common.contender("epi-torch", ps, False),
                   "EPIAdamW, bf16 scores": lambda ps: common.EPIAdamW(
                       ps, isolation_ratio=0.01, refresh_interval=10**9, warmup_steps=2,
                       importance_dtype=torch.bfloat16),
                   "EPIAdamW, importance=exp_avg_sq": lambda ps: common.contender("epi-torch-v", ps, False)}
        base = None
        for name, make in configs.items():
            params = common.make_params(case, dtype, device)
            opt = make(params)
            for _ in range(3):
                opt.step()
            per_param = common.state_bytes_per_param(opt)
            base = per_param if base is None else base
            # the eager backend's cache of flat isolated indices: int64 per isolated element
            backend = opt.param_groups[0].get("backend")  # (None: torch's AdamW)
            cached = backend is not None and registry.resolve(backend, params[0].device).wants_isolated_indices
            cache = sum(8 * int(opt.isolation_mask(p).sum()) for p in params) / case.numel if cached else 0.0
            rows.append({"param_dtype": str(dtype).removeprefix("torch."), "optimizer": name,
                         "state_bytes_per_param": per_param, "over_adamw": per_param - base,
                         "index_cache_bytes_per_param": cache})
    return rows


def copy_bandwidth(device, reps) -> float | None:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer; None on CPU."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(1 << 28, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(common.timed(lambda: dst.copy_(src), device) for _ in range(reps))
    return 2 * src.numel() * 4 / t / 1e9


def print_tables(res) -> None:
    print(f"\n# epi_kernels benchmarks: {res['machine']['device']} {res['machine'].get('gpu') or res['machine']['cpu']}"
          f", torch {res['machine']['torch']}, {res['machine']['date']}")
    copy = res.get("copy_gb_per_s")
    if copy:
        print(f"device-to-device copy: {copy:.0f} GB/s")
    print(f"\n{'case':>8} {'dtype':>8} {'thr':>3} {'step':>7} {'contender':>14} {'median ms':>10} {'q1..q3 ms':>17} "
          f"{'GB/s':>7} {'x fused':>8} {'x foreach':>9}" + ("  % copy" if copy else ""))
    for r in res["steps"]:
        line = (f"{r['case']:>8} {r['dtype']:>8} {r['threads'] or '-':>3} {r['step']:>7} {r['contender']:>14} "
                f"{r['median_ms']:>10.2f} {r['q1_ms']:>8.2f}..{r['q3_ms']:<8.2f} {r['gb_per_s']:>7.1f} "
                f"{r['vs_adamw-fused']['median']:>8.2f} {r['vs_adamw-foreach']['median']:>9.2f}")
        print(line + (f"  {100 * r['gb_per_s'] / copy:5.1f}" if copy else ""))
    print(f"\n{'numel':>10} {'thr':>3} {'threshold / refresh':>26} {'median ms':>10} {'min..max ms':>19} "
          f"{'speedup vs exact':>16}")
    for r in res["threshold"]:
        sp = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
        print(f"{r['numel']:>10} {r['threads'] or '-':>3} {r['what']:>26} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>9.2f}..{r['max_ms']:<9.2f} {sp['median']:>16.2f}")
    if res.get("kernel_variants"):
        print(f"\n{'case':>8} {'dtype':>8} {'backend':>7} {'step':>10} {'median ms':>10} {'q1..q3 ms':>17} {'x plain':>8}")
        for r in res["kernel_variants"]:
            print(f"{r['case']:>8} {r['dtype']:>8} {r['backend']:>7} {r['variant']:>10} {r['median_ms']:>10.3f} "
                  f"{r['q1_ms']:>8.3f}..{r['q3_ms']:<8.3f} {r['vs_plain']['median']:>8.3f}")
    print(f"\n{'param dtype':>11} {'optimizer':>22} {'state B/param':>14} {'over AdamW':>11} {'index cache B/param':>20}")
    for r in res["memory"]:
        print(f"{r['param_dtype']:>11} {r['optimizer']:>22} {r['state_bytes_per_param']:>14.3f} "
              f"{r['over_adamw']:>11.3f} {r['index_cache_bytes_per_param']:>20.3f}")


def targets(res) -> list[dict]:
    """The CPU targets of the benchmark issues (one 25M-parameter fp32 tensor and the model-like mix;
    the 57-tensor Llama and the 7-tensor case), checked against this run's medians."""
    out = []

    def step_ratio(case, contender, baseline, threads):
        rows = [r for r in res["steps"] if r["case"] == case and r["contender"] == contender and
                r["dtype"] == "float32" and r["step"] == "normal" and r["threads"] == threads]
        return rows[0][f"vs_{baseline}"]["median"] if rows else None

    mix = next((c for c in res["config"]["cases"] if c.startswith("mix-")), None)
    llama = next((c for c in res["config"]["cases"] if c.startswith("llama-")), None)
    limits = {"25M": (1.5, 1.3, 1.1), mix: (1.5, 1.3, 1.1),  # the first benchmark issue's
              llama: (1.15, 1.3, 1.05), "7x-25M": (1.15, 1.3, 1.05)}  # the tensor-mix issue's
    for t in res["config"]["threads"]:
        for case, (compiled, eager, v) in limits.items():
            for contender, baseline, limit in (("epi-compiled", "adamw-fused", compiled),
                                               ("epi-torch", "adamw-foreach", eager),
                                               ("epi-compiled-v", "adamw-fused", v)):
                r = step_ratio(case, contender, baseline, t)
                if r is not None:
                    out.append({"target": f"{contender} / {baseline}, {case} fp32 step, {t} thread(s)",
                                "limit": f"<= {limit}", "measured": r, "met": r <= limit})
        for r in res["threshold"]:
            if r["numel"] == 16 * common.MiB and r["threads"] == t and r["what"].startswith("refresh"):
                sp = r["speedup_vs_torch.kthvalue"]["median"]
                out.append({"target": f"{r['what']} vs torch.kthvalue, 16M, {t} thread(s)", "limit": ">= 3",
                            "measured": sp, "met": sp >= 3})
    return out


def gpu_targets(res) -> list[dict]:
    """The GPU targets (README "Benchmarks and performance") for each kernel backend, from this run's medians,
    and the CUDA backend at least as fast as the Triton one on every benchmarked size."""
    out = []
    copy = res.get("copy_gb_per_s")
    normal = {(r["contender"], r["case"], r["dtype"]): r for r in res["steps"] if r["step"] == "normal"}
    for (contender, case, dtype), r in normal.items():
        backend = common.contender_backend(contender)
        if backend not in registry.names() or not registry.get(backend).refreshes_in_step:
            continue
        if contender.endswith("-v"):  # importance="exp_avg_sq": AdamW's bytes + 1 bit, so AdamW's time
            if dtype == "float32":
                fused = r["vs_adamw-fused"]["median"]
                out.append({"target": f"{contender} / adamw-fused, {case} fp32", "limit": "<= 1.05",
                            "measured": fused, "met": fused <= 1.05})
            continue
        if backend == "cuda" and ("epi-triton", case, dtype) in normal:
            ratio = r["median_ms"] / normal["epi-triton", case, dtype]["median_ms"]
            out.append({"target": f"epi-cuda / epi-triton, {case} {dtype}", "limit": "<= 1.00",
                        "measured": ratio, "met": ratio <= 1.0})
        if dtype != "float32":
            continue
        pct = 100 * r["gb_per_s"] / copy
        fused = r["vs_adamw-fused"]["median"]
        out.append({"target": f"{contender} GB/s as % of device copy, {case} fp32", "limit": ">= 85",
                    "measured": pct, "met": pct >= 85})
        out.append({"target": f"{contender} / adamw-fused, {case} fp32", "limit": "<= 1.35",
                    "measured": fused, "met": fused <= 1.35})
        speedup = normal["unfused", case, dtype]["median_ms"] / r["median_ms"]
        out.append({"target": f"{contender} speedup over unfused EPI ops, {case} fp32", "limit": ">= 5",
                    "measured": speedup, "met": speedup >= 5})
    for case, backend in sorted({(r["case"], r["backend"]) for r in res["kernel_variants"]}):
        rows = {r["variant"]: r for r in res["kernel_variants"]
                if r["case"] == case and r["backend"] == backend and r["dtype"] == "float32"}
        if {"plain", "histogram", "refresh"} <= rows.keys():
            extra = 100 * ((rows["histogram"]["median_ms"] + rows["refresh"]["median_ms"])
                           / (2 * rows["plain"]["median_ms"]) - 1)
            out.append({"target": f"{backend} histogram + select overhead (mean of the two steps vs plain), "
                                  f"{case} fp32", "limit": "<= 5 %", "measured": extra, "met": extra <= 5})
    return out


def markdown(res) -> str:
    """A README-ready summary of a results file: EPI step ratios, refresh, memory, targets."""
    m = res["machine"]
    hw = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    copy = res.get("copy_gb_per_s")
    lines = [f"Measured {m['date']} on {hw} ({m['device']}), torch {m['torch']}, triton {m.get('triton')}, "
             f"git {m['git_rev']}; medians of {res['config']['reps']} interleaved rounds."
             + (f" Device-to-device copy: {copy:.0f} GB/s." if copy else ""), "",
             "| case | dtype | threads | step | contender | median ms | GB/s | x AdamW fused | x AdamW foreach |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        if r["contender"].startswith("adamw"):
            continue
        lines.append(f"| {r['case']} | {r['dtype']} | {r['threads'] or '-'} | {r['step']} | {r['contender']} | "
                     f"{r['median_ms']:.1f} | {r['gb_per_s']:.1f} | {r['vs_adamw-fused']['median']:.2f} | "
                     f"{r['vs_adamw-foreach']['median']:.2f} |")
    lines += ["", "| numel | threads | threshold / refresh | median ms | speedup vs exact |", "|---|---|---|---|---|"]
    for r in res["threshold"]:
        sp = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
        lines.append(f"| {r['numel']} | {r['threads'] or '-'} | {r['what']} | {r['median_ms']:.1f} | {sp['median']:.2f} |")
    if res.get("kernel_variants"):
        lines += ["", "| case | dtype | backend | step | median ms | x plain |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['dtype']} | {r['backend']} | {r['variant']} | {r['median_ms']:.3f} | "
                  f"{r['vs_plain']['median']:.3f} |" for r in res["kernel_variants"]]
    lines += ["", "| param dtype | optimizer | state B/param | over AdamW |", "|---|---|---|---|"]
    lines += [f"| {r['param_dtype']} | {r['optimizer']} | {r['state_bytes_per_param']:.3f} | {r['over_adamw']:.3f} |"
              for r in res["memory"]]
    if res.get("targets"):
        lines += ["", "| target | limit | measured | |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['limit']} | {t['measured']:.2f} | {'met' if t['met'] else '**missed**'} |"
                  for t in res["targets"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds (under a minute on CPU)")
    ap.add_argument("--dry", action="store_true",
                    help="the GPU code paths on CPU in Triton's interpreter, toy sizes (a code check, not a benchmark)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma list (default: all available; quick: torch)")
    ap.add_argument("--threads", default=None, help="CPU thread counts, comma list (default 1,2; quick: 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per contender")
    ap.add_argument("--cases", default=None, help="comma list of step cases to run (e.g. 25M; default: all)")
    ap.add_argument("--out", default=None,
                    help=f"folder for the JSON results (default {RESULTS.relative_to(RESULTS.parents[1])}, "
                         "dry runs: none; '' = do not write)")
    ap.add_argument("--quiet", action="store_true", help="write the JSON only, print no tables")
    ap.add_argument("--report", metavar="JSON", help="print a results file as markdown (README tables) and exit")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(pathlib.Path(args.report).read_text())
        print(markdown(res))
        return res

    if args.dry:  # (the interpreter and host harness were switched on above, before the imports)
        args.device, args.quick = "cpu", True
    cuda = args.device.startswith("cuda")
    default_backends = [*common.kernel_backends(), "torch"] if args.dry else ["torch"] if args.quick else common.runnable_backends(args.device)
    backends = args.backends.split(",") if args.backends else default_backends
    reps = args.reps or (1 if args.dry else 3 if args.quick else 9)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    threads = [None] if cuda or args.dry else [int(t) for t in (args.threads or ("2" if args.quick else "1,2")).split(",")]
    cases = common.dry_cases() if args.dry else common.gpu_cases(args.quick) if cuda else common.cpu_cases(args.quick)
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
        if not cases:
            ap.error(f"--cases {args.cases}: no such case (cases here: 1M, 25M, mix-..., 16M, 128M)")

    res = {"machine": common.machine_info(args.device),
           "config": {"quick": args.quick, "dry": args.dry, "backends": backends, "reps": reps, "threads": threads,
                      "cases": [c.name for c in cases], "dtypes": [str(d) for d in dtypes],
                      "bytes_model": common.__doc__.strip()},
           "copy_gb_per_s": copy_bandwidth(args.device, reps), "steps": []}
    sizes = [1 << 14] if args.dry else [common.MiB] if args.quick else [common.MiB, 16 * common.MiB]
    res["threshold"] = []
    if len(threads) > 1:
        # one process per thread count: Inductor's CPU kernels keep the thread count they were
        # compiled under, so a second count in the same process would be measured wrongly
        for t in threads:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                       "--threads", str(t), "--out", tmp, "--quiet"]
                subprocess.run(cmd, check=True)
                part = json.loads(next(pathlib.Path(tmp).glob("*.json")).read_text())
            res["steps"] += part["steps"]
            res["threshold"] += part["threshold"]
    else:
        if threads[0] is not None:
            torch.set_num_threads(threads[0])
        res["steps"] += bench_steps(args.device, cases, dtypes, backends, reps, threads[0])
        res["threshold"] += bench_threshold(args.device, sizes, reps, threads[0], backends)
    fused = [b for b in backends if registry.get(b).refreshes_in_step]
    res["kernel_variants"] = bench_kernel_variants(args.device, cases, dtypes, reps, fused) if cuda or args.dry else []
    res["memory"] = bench_memory(args.device)
    res["targets"] = gpu_targets(res) if cuda else [] if args.dry else targets(res)
    if not args.quiet:
        print_tables(res)
    for t in res["targets"] if not args.quiet else []:
        print(f"target {t['target']}: {t['limit']}, measured {t['measured']:.2f}: {'met' if t['met'] else 'MISSED'}")
    if args.out is None and not args.dry:
        args.out = str(RESULTS)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        mode = "dry" if args.dry else "quick" if args.quick else "full"
        name = f"{res['machine']['date'][:10]}-{args.device.split(':')[0]}-{mode}.json"
        (out / name).write_text(json.dumps(res, indent=1))
        if not args.quiet:
            print(f"\nwrote {out / name}")
    return res


if __name__ == "__main__":
    main()
