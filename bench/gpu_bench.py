"""The GPU step benchmark for one short call on a lent GPU (bench/device_check.sh runs it first).

Per case (one flat tensor, and ~200 model-shaped tensors from bench.common.model_mix; 16M and 256M
parameters) and param dtype (fp32, bf16), the optimizer step time of:

    adamw-fused            torch.optim.AdamW(fused=True), the baseline of every ratio
    epi-cuda, epi-triton   EPIAdamW(backend=...), a mask in force, no refresh (bench.common.contender)
    epi-cuda-v, -triton-v  the same with importance="exp_avg_sq" (AdamW's bytes + one mask bit)
    epi-cuda / -triton     step "refresh": refresh_interval=1, so every timed step refreshes the masks
    epi-*-global           step "refresh" with scope="global" (the paper's selection, selected in the
                           step by both kernel sets): its ratio to the per-tensor refresh row of the
                           same backend is the cost of a global refresh

Contenders of a case step identical tensors and are timed interleaved (A, B, C, A, B, C, ...) with
CUDA events, no host sync between steps: a step's time is what the device spends on it, gaps while
it waits for the host's launches included. Per row: median and spread of the timed steps, GB/s by
the bytes model (bench.common.bytes_per_element; refresh rows use a normal step's bytes), % of a
device-to-device copy that moves the same bytes (timed the same way in the same run), the per-round
ratio to adamw-fused, and the host time of opt.step() (time.perf_counter, no sync, a separate loop).
Then the CUDA-graph check: EPIAdamW(capturable=True) stepped by replays of one captured step must
end bit-identical (params and state) to eager twins stepped alike, capturable=True and False.

Every (case, dtype, contender) row is in the results from the start ("pending") and gets a status:
measured, unavailable (backend not built / not installed), error, or skipped (the --budget-s time
box ran out before its case started). gpu_bench.json and gpu_bench.md are rewritten after every
case, so a run killed by its time box still leaves what it measured.

    python bench/gpu_bench.py --out DIR [--budget-s 110] [--steps 25] [--cases 16M,256M] [--no-graph-check]
    python bench/gpu_bench.py --dry --out DIR   # the same code on CPU: Triton's interpreter, the CUDA
                                                # extension's host harness, toy sizes, perf_counter
                                                # timings, capturable steps without a graph
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

DRY = "--dry" in sys.argv
if DRY:  # before anything imports Triton: triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["EPI_CUDA_HOST"] = "1"  # backend="cuda" on CPU tensors, in the extension's host harness
STARTED = time.monotonic()  # the time box counts from the start of the process, imports included

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench import common  # noqa: E402
from epi_kernels import EPIAdamW  # noqa: E402
from epi_kernels import backends as registry  # noqa: E402

BASELINE = "adamw-fused"
KERNEL_BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.bfloat16)
MIX_TENSORS = 200  # a model's worth of tensors: where the host's per-tensor work shows


@dataclass(frozen=True)
class Contender:
    kind: str  # a bench.common.contender kind
    refresh: bool  # every step refreshes the masks (else a mask in force, no refresh)

    @property
    def backend(self) -> str | None:
        return None if self.kind == BASELINE else common.contender_backend(self.kind)

    @property
    def step(self) -> str:
        return "refresh" if self.refresh else "normal"

    def bytes_per_element(self, dtype: torch.dtype) -> float:
        score = None if self.kind == BASELINE or self.kind.endswith("-v") else torch.float32
        return common.bytes_per_element(dtype, score, mask=self.kind != BASELINE)


CONTENDERS = ([Contender(BASELINE, False)] + [Contender(f"epi-{b}", False) for b in KERNEL_BACKENDS]
              + [Contender(f"epi-{b}-v", False) for b in KERNEL_BACKENDS]
              + [Contender(f"epi-{b}", True) for b in KERNEL_BACKENDS]
              + [Contender(f"epi-{b}-global", True) for b in KERNEL_BACKENDS])


# ------------------------------------------------------------------------------------------ cases

def model_shaped(total: int, tensors: int = MIX_TENSORS) -> common.Case:
    """common.model_mix of about `total` parameters at the width (a multiple of 32) that gives the
    tensor count nearest `tensors`."""
    mixes = (common.model_mix(total, width) for width in range(32, 4097, 32))
    return min(mixes, key=lambda case: abs(len(case.shapes) - tensors))


def gpu_cases() -> list[common.Case]:
    # cheap cases first: a time box that runs out loses the most expensive ones
    return [common.flat(16 * common.MiB, "16M"), model_shaped(16 * common.MiB),
            common.flat(256 * common.MiB, "256M"), model_shaped(256 * common.MiB)]


def dry_cases() -> list[common.Case]:
    # toy sizes for Triton's interpreter, whose time goes with tensors and elements: one tensor, and
    # model_mix's one-layer shapes at width 4 (11 tensors) with its 8192-row embedding cut to 256 rows
    return [common.flat(1 << 10, "dry-1K"), common.Case("dry-mix", ((256, 4),) + common.model_mix(0, 4).shapes[1:])]


# ----------------------------------------------------------------------------------------- timing

def timed_call(fn: Callable[[], object], cuda: bool) -> Callable[[], float]:
    """Call fn once; return how to read its duration in seconds (on CUDA: after a sync). CUDA
    events time the device without syncing the host; on CPU every op is synchronous."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return lambda: start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return lambda: seconds


def interleaved_seconds(fns: dict, rounds: int, device: str) -> dict[object, list[float]]:
    """Seconds per call of each fn, over `rounds` rounds of one call each, in turn."""
    cuda = device.startswith("cuda")
    readers = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            readers[key].append(timed_call(fn, cuda))
    common.sync(device)
    return {key: [read() for read in reads] for key, reads in readers.items()}


def host_seconds(step: Callable[[], object], steps: int, device: str) -> list[float]:
    """Host time per call (no sync around the calls: what the host spends launching a step)."""
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    common.sync(device)
    return out


def copy_seconds(nbytes: float, device: str, rounds: int) -> list[float]:
    """A device-to-device copy that moves `nbytes` (reads half, writes half), timed as the steps are."""
    src = torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    return interleaved_seconds({"copy": lambda: dst.copy_(src)}, rounds, device)["copy"]


# ------------------------------------------------------------------------------------------- rows

def plan_rows(cases, dtypes) -> list[dict]:
    """Every row the run will fill, pending until measured (a killed run still shows what is missing)."""
    return [{"case": case.name, "numel": case.numel, "tensors": len(case.shapes),
             "dtype": str(dtype).removeprefix("torch."), "contender": c.kind, "step": c.step,
             "backend": c.backend, "status": "pending"}
            for case in cases for dtype in dtypes for c in CONTENDERS]


def why_unavailable(backend: str | None, device: str) -> str | None:
    """Why `backend` cannot step tensors on `device` here (None: it can)."""
    if backend is None:
        return None
    if backend not in registry.available_backends():
        return f"backend {backend!r} not available ({registry.get(backend).install_hint or 'not installed'})"
    return registry.get(backend).device_error(torch.device(device))


def same_tensors(master: list[torch.nn.Parameter], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """A contender's own copy of the case's parameters and gradients, in `dtype` (from fp32, as
    common.make_params converts them)."""
    params = []
    for m in master:
        p = torch.nn.Parameter(m.detach().to(dtype, copy=True))
        p.grad = m.grad.to(dtype, copy=True)
        params.append(p)
    return params


def bench_case(case, dtype, master, rows, device, args) -> None:
    """Fill the rows of one (case, dtype): build and warm up every contender, time them, free them."""
    mine = {(r["contender"], r["step"]): r for r in rows
            if r["case"] == case.name and r["dtype"] == str(dtype).removeprefix("torch.")}
    row = {c: mine[c.kind, c.step] for c in CONTENDERS}
    # the copies first, while no optimizer state is allocated (256M fp32: ~10 GB of buffers)
    nbytes = {c: case.numel * c.bytes_per_element(dtype) for c in CONTENDERS}
    copies = {n: copy_seconds(n, device, args.steps) for n in sorted(set(nbytes.values()))}
    if device == "cuda":
        torch.cuda.empty_cache()  # the copy buffers' blocks, before the contenders allocate theirs
    opts = {}
    for c in CONTENDERS:
        why = why_unavailable(c.backend, device)
        if why:
            row[c].update(status="unavailable", why=why)
            continue
        try:
            opt = common.contender(c.kind, same_tensors(master, dtype), c.refresh)
            for _ in range(args.warmup):  # state, the first refresh (step 2), Triton's JIT compiles
                opt.step()
            common.sync(device)
        except Exception as e:  # noqa: BLE001 - one contender's failure is a result, not the end of the run
            row[c].update(status="error", why=f"{type(e).__name__}: {e}"[:2000])
            continue
        opts[c] = opt
    device_s = interleaved_seconds({c: opt.step for c, opt in opts.items()}, args.steps, device)
    host_s = {c: host_seconds(opt.step, args.steps, device) for c, opt in opts.items()}
    base = opts.keys() & {Contender(BASELINE, False)}
    for c in opts:
        stats = common.summary(device_s[c])
        copy = common.summary(copies[nbytes[c]])
        row[c].update(status="measured", **stats, bytes_per_element=nbytes[c] / case.numel,
                      gb_per_s=nbytes[c] / stats["median_ms"] / 1e6, copy_median_ms=copy["median_ms"],
                      pct_of_copy=100 * copy["median_ms"] / stats["median_ms"],
                      host=common.summary(host_s[c]),
                      **{f"vs_{BASELINE}": common.ratio_summary(device_s[c], device_s[b]) for b in base})
    del opts


# ------------------------------------------------------------------------------------ graph check

GRAPH_EPI = dict(isolation_ratio=0.2, refresh_interval=3, warmup_steps=2, weight_decay=0.1, lr=1e-2)
GRAPH_STEPS, EAGER_BEFORE_CAPTURE = 12, 3  # replays do steps 4-12: refreshes at 5, 8 and 11


def graph_case(dry: bool) -> common.Case:
    """Small tensors: one of two chunks (abi.CHUNK = 8192), one whose size is no multiple of the
    vector width (the misaligned kernel variants); in the interpreter just two small tensors."""
    return common.Case("graph", ((16, 12), (3, 7)) if dry else ((64, 200), (200,), (1000,), (3, 7)))


def step_gradients(case: common.Case, dtype: torch.dtype, device: str) -> list[list[torch.Tensor]]:
    """Fresh gradients for every step of the graph check (the scores, and so the masks, move)."""
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g).to(device, dtype) for s in case.shapes] for _ in range(GRAPH_STEPS)]


def captured(step: Callable[[], object]) -> Callable[[], object]:
    """`step` captured once in a CUDA graph, as its replay (the capture itself runs nothing)."""
    common.sync("cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # on a capture stream of its own
        step()
    return graph.replay


def differences(params_a, opt_a, params_b, opt_b) -> list[str]:
    """What differs, bit for bit, between two optimizers' params and state (all-NaN equals all-NaN)."""
    out = []
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        if not torch.equal(p, q):
            out.append(f"param {i}")
        sa, sb = opt_a.state[p], opt_b.state[q]
        if sa.keys() != sb.keys():
            out.append(f"param {i} state keys {sorted(sa.keys() ^ sb.keys())}")
        for key in sa.keys() & sb.keys():
            x, y = sa[key], sb[key]
            if torch.is_tensor(x) and torch.is_tensor(y):
                y = y.to(x.device)
                same = torch.equal(x, y) or (x.is_floating_point() and bool(x.isnan().all()) and bool(y.isnan().all()))
            else:
                same = not (torch.is_tensor(x) or torch.is_tensor(y)) and x == y
            if not same:
                out.append(f"param {i} state {key}")
    return out


def graph_check(backend: str, dtype: torch.dtype, device: str, case: common.Case) -> dict:
    """Replays of one captured capturable step against eager twins (on CPU: the capturable steps
    called directly, no graph). Twins: capturable=True (the same step, not replayed) and
    capturable=False (refreshes decided on the host)."""
    cuda = device.startswith("cuda")
    entry = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "steps": GRAPH_STEPS,
             "shapes": [list(shape) for shape in case.shapes],
             "mode": "cuda graph replays" if cuda else "capturable steps, no graph (CPU)"}
    why = why_unavailable(backend, device)
    if why:
        return {**entry, "status": "unavailable", "why": why, "passed": None}
    try:
        grads = step_gradients(case, dtype, device)

        def stepped(capturable: bool, graph: bool):
            params = common.make_params(case, dtype, device)
            opt = EPIAdamW(params, backend=backend, capturable=capturable, **GRAPH_EPI)
            step = opt.step
            for i in range(GRAPH_STEPS):
                if graph and i == EAGER_BEFORE_CAPTURE and cuda:
                    step = captured(opt.step)
                for p, g in zip(params, grads[i]):
                    p.grad.copy_(g)  # into the captured gradient tensors
                step()
            common.sync(device)
            return params, opt

        replayed = stepped(True, graph=True)
        found = {twin: differences(*replayed, *stepped(capturable, graph=False))
                 for twin, capturable in (("eager capturable=True", True), ("eager capturable=False", False))}
    except Exception as e:  # noqa: BLE001 - a failed capture is the result of this check
        return {**entry, "status": "error", "why": f"{type(e).__name__}: {e}"[:2000], "passed": False}
    return {**entry, "status": "measured", "passed": not any(found.values()),
            "differences": {twin: diffs[:20] for twin, diffs in found.items()}}


# ----------------------------------------------------------------------------------------- output

def markdown(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    lines = [f"# gpu_bench: {m.get('gpu') or m['cpu']} ({m['device']}), torch {m['torch']}, triton {m['triton']}, "
             f"cuda {m['cuda']}, git {m['git_rev']}, {m['date']}", "",
             f"{'DRY RUN (CPU, interpreter/host harness: the timings mean nothing). ' if cfg['dry'] else ''}"
             f"Median of {cfg['steps']} interleaved timed steps after {cfg['warmup']} warm-up steps "
             f"({'CUDA events' if cfg['cuda_events'] else 'perf_counter'}); GB/s by the bytes model; "
             f"% copy: a device-to-device copy of the same bytes; x fused: per-round ratio to {BASELINE}; "
             f"host: perf_counter around opt.step(), no sync. Run took {res['elapsed_s']:.0f} s"
             f"{'' if res['complete'] else ' (INCOMPLETE)'}.", "",
             "| case | tensors | dtype | contender | step | median ms | q1..q3 ms | min..max ms | GB/s | % copy "
             "| x fused | host ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        head = f"| {r['case']} | {r['tensors']} | {r['dtype']} | {r['contender']} | {r['step']} |"
        if r["status"] != "measured":
            lines.append(f"{head} {r['status']}: {r.get('why', '')[:120]} |" + " |" * 6)
            continue
        ratio = r.get(f"vs_{BASELINE}")
        lines.append(f"{head} {r['median_ms']:.3f} | {r['q1_ms']:.3f}..{r['q3_ms']:.3f} | "
                     f"{r['min_ms']:.3f}..{r['max_ms']:.3f} | {r['gb_per_s']:.0f} | {r['pct_of_copy']:.1f} | "
                     f"{ratio['median'] if ratio else math.nan:.2f} | {r['host']['median_ms']:.3f} |")
    lines += ["", "| CUDA-graph check | dtype | mode | result |", "|---|---|---|---|"]
    for g in res["graph_check"]:
        verdict = {True: "pass", False: "**FAIL**", None: "-"}[g["passed"]]
        detail = g.get("why") or "; ".join(f"{t}: {', '.join(d)}" for t, d in g.get("differences", {}).items() if d)
        lines.append(f"| {g['backend']} | {g['dtype']} | {g['mode']} | {verdict}{': ' + detail[:200] if detail else ''} |")
    return "\n".join(lines) + "\n"


def write(res: dict, out: pathlib.Path | None) -> None:
    """Both files, each replaced whole (a kill mid-write leaves the previous version)."""
    res["elapsed_s"] = time.monotonic() - STARTED
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_bench.json", json.dumps(res, indent=1)), ("gpu_bench.md", markdown(res))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, toy sizes, the kernels emulated (a code check)")
    ap.add_argument("--out", default=None, help="folder for gpu_bench.json and gpu_bench.md (default: print only)")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="start no case after this many seconds from the process start (the graph check still runs)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 25; dry 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 3: state, first refresh, compile)")
    ap.add_argument("--cases", default=None, help="comma list of case names to run (default: all)")
    ap.add_argument("--graph-check", action=argparse.BooleanOptionalAction, default=True,
                    help="the CUDA-graph check after the cases (default: on)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry else "cuda"
    if args.dry:
        torch.set_num_threads(1)  # a code check: leave the other cores alone
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry for the CPU check")
    args.steps = args.steps or (2 if args.dry else 25)
    cases = dry_cases() if args.dry else gpu_cases()
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
        if not cases:
            ap.error(f"--cases {args.cases}: no such case")
    out = pathlib.Path(args.out) if args.out else None
    res = {"machine": common.machine_info(device),
           "config": {"dry": args.dry, "device": device, "cuda_events": device == "cuda", "steps": args.steps,
                      "warmup": args.warmup, "budget_s": args.budget_s,
                      "cases": [{"name": c.name, "numel": c.numel, "tensors": len(c.shapes)} for c in cases],
                      "dtypes": [str(d).removeprefix("torch.") for d in DTYPES],
                      "contenders": [f"{c.kind} {c.step}" for c in CONTENDERS],
                      "bytes_model": common.__doc__.strip()},
           "backends": {b: why_unavailable(b, device) or "available" for b in KERNEL_BACKENDS},
           "steps": plan_rows(cases, DTYPES), "cases_run": [], "graph_check": [], "complete": False}
    write(res, out)
    for case in cases:
        master = None
        for dtype in DTYPES:
            label = f"{case.name} {str(dtype).removeprefix('torch.')}"
            if time.monotonic() - STARTED > args.budget_s:
                for r in res["steps"]:
                    if r["status"] == "pending" and f"{r['case']} {r['dtype']}" == label:
                        r.update(status="skipped", why=f"time box: {args.budget_s:.0f} s spent before this case")
                print(f"{label}: skipped (time box)", flush=True)
                continue
            t0 = time.monotonic()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if master is None:  # once per case (both dtypes start from it): the CPU's RNG is slow at 256M
                master = common.make_params(case, torch.float32, device)
            try:
                bench_case(case, dtype, master, res["steps"], device, args)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next case may still run
                for r in res["steps"]:
                    if r["status"] == "pending" and f"{r['case']} {r['dtype']}" == label:
                        r.update(status="error", why=f"{type(e).__name__}: {e}"[:2000])
            gc.collect()  # optimizers hold reference cycles: free their state before the next case
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            if device == "cuda":
                torch.cuda.empty_cache()
            res["cases_run"].append({"case": case.name, "dtype": label.split()[1], "seconds": time.monotonic() - t0,
                                     "peak_gib": peak})
            write(res, out)
            print(f"{label}: {time.monotonic() - t0:.1f} s" + (f", peak {peak:.1f} GiB" if peak else ""), flush=True)
        del master
        gc.collect()
    # last: a capture that goes wrong can leave the CUDA context unusable for anything after it
    for backend in KERNEL_BACKENDS if args.graph_check else ():
        for dtype in DTYPES:
            res["graph_check"].append(graph_check(backend, dtype, device, graph_case(args.dry)))
            write(res, out)
    res["complete"] = True
    write(res, out)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
