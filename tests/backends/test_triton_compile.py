"""The Triton kernels held to the real compiler: every variant the launchers can produce compiles
for sm_80, sm_90, sm_100 and sm_120 (A100, H100, B200, RTX 50 / RTX PRO Blackwell: PTX, then a cubin
by the ptxas Triton ships), and the machine code has the properties the kernels are designed for, on
each of the four. No GPU needed: tests/support/triton_aot.py drives the launchers, compiles what
they launch and reports; these tests read the report.

Triton's interpreter, which the other tests use, accepts programs the compiler rejects and says
nothing about speed: this is the check that the GPU path exists at all.

Each Triton installation is checked: the one installed, plus each folder in EPI_TRITON_EXTRA
(os.pathsep-separated; a `pip install --target` of another Triton, e.g. 3.6.0, the GPU machine's).
.ci/run sets it; under CI a missing extra installation is an error, not a skip.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[triton])")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AOT = os.path.join(ROOT, "tests", "support", "triton_aot.py")
EXTRA = [p for p in os.environ.get("EPI_TRITON_EXTRA", "").split(os.pathsep) if p]
ENVIRONMENTS = [None] + EXTRA  # None: the Triton installed in this environment

ELEMENTS_PER_THREAD = 4  # BLOCK / (32 * num_warps) in triton_backend: one 128-bit access per fp32 column
FP32_LOADS, FP32_STORES = 5, 4  # per thread and tile: p, g, m, v, s read; s, m, v, p written
HIST_INSTRUCTIONS_PER_ELEMENT = 40  # PTX instructions the window histogram adds per element (measured: ~32)
ARCHS = [80, 90, 100, 120]  # the targets triton_aot.py compiles for by default
FALLBACK_STACK = 8  # bytes, outside every loop, of the misaligned fused step only (test_no_kernel_spills)
MIN_OCCUPANCY = 0.25  # of the fused step; the design asks 0.5 (the CUDA kernels reach it), see bench/README.md


def test_ci_checks_the_gpu_machines_triton():
    if os.environ.get("CI") == "true":
        assert EXTRA, "CI must compile the kernels under the GPU machine's Triton too: set EPI_TRITON_EXTRA"


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    """One report per Triton installation, compiled in parallel (one process each)."""
    out = tmp_path_factory.mktemp("triton-aot")
    procs = []
    for i, extra in enumerate(ENVIRONMENTS):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([p for p in (extra, ROOT, env.get("PYTHONPATH")) if p])
        path = out / f"report-{i}.json"
        procs.append((path, subprocess.Popen([sys.executable, AOT, str(path)], env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True)))
    reports = []
    for path, proc in procs:
        log = proc.communicate(timeout=1800)[0]
        assert proc.returncode == 0, f"triton_aot.py failed:\n{log[-5000:]}"
        reports.append(json.loads(path.read_text()))
    return reports


@pytest.fixture(params=range(len(ENVIRONMENTS)), ids=["installed"] + [f"extra{i}" for i in range(len(EXTRA))])
def report(request, reports):
    return reports[request.param]


def fused_steps(report, **constexprs):
    out = [v for v in report["variants"] if v["kernel"] == "fused_step_kernel" and "error" not in v
           and all(v["constexprs"][k] == want for k, want in constexprs.items())]
    assert out, f"no compiled fused step with {constexprs}"
    return out


def hot_loops(variant):
    """The PTX loops over full tiles on the vector path (they hold the tile's 128-bit stores)."""
    return [loop for loop in variant["ptx_loops"] if loop["st_v4"] > 0]


@pytest.mark.slow  # the report: every variant compiled (minutes)
def test_every_variant_compiles(report):
    errors = [f"{v['kernel']} sm_{v['arch']} {v.get('constexprs')}:\n{v['error']}"
              for v in report["variants"] if "error" in v]
    assert not errors, f"Triton {report['triton']}: {len(errors)} variants do not compile:\n" + "\n".join(errors[:3])
    assert sorted(report["archs"]) == ARCHS, report["archs"]
    assert sorted({v["arch"] for v in report["variants"]}) == ARCHS
    for arch in report["archs"]:
        launched = {v["kernel"] for v in report["variants"] if v["arch"] == arch}
        assert launched == set(report["kernels"]), f"kernels the launchers never launch: {set(report['kernels']) - launched}"
    # archs x param dtypes x (2 score dtypes + scores from exp_avg_sq) x amsgrad x aligned
    assert len(fused_steps(report)) == len(report["archs"]) * 3 * 3 * 2 * 2


@pytest.mark.slow
@pytest.mark.parametrize("score", [True, False], ids=["own-scores", "exp_avg_sq-scores"])
def test_fp32_fused_step_uses_128_bit_accesses(report, score):
    """On every target, the fp32 step's tile loop reads and writes each column with 128-bit (or
    wider) accesses, in the PTX and in the SASS."""
    # importance="exp_avg_sq" (SCORE off) neither loads nor stores a score: one access fewer each way
    fewer = 0 if score else 1
    variants = fused_steps(report, P_TYPE="fp32", S_TYPE="fp32", ALIGNED="True", SCORE=str(score))
    assert sorted({v["arch"] for v in variants}) == ARCHS
    for v in variants:
        extra = v["constexprs"]["AMSGRAD"] == "True"
        loops = hot_loops(v)
        assert loops, f"sm_{v['arch']}: no loop with 128-bit stores"
        for loop in loops:
            assert loop["ld_v4"] >= FP32_LOADS - fewer + extra and loop["st_v4"] >= FP32_STORES - fewer + extra, (
                v["arch"], loop)
            if not score:  # and no more than that: the score column is never touched
                assert loop["ld_v4"] == FP32_LOADS - 1 + extra and loop["st_v4"] == FP32_STORES - 1 + extra, loop
        sass = [loop for loop in v["sass_loops"] if loop["stg128"]]
        assert sass and all(loop["ldg128"] >= FP32_LOADS - fewer + extra for loop in sass), (v["arch"], v["sass_loops"])


@pytest.mark.slow
def test_no_kernel_spills(report):
    """No variant spills inside a loop, and none but the misaligned fused step (the scalar fallback for
    views that are not 16-byte aligned) has a stack frame at all. That one may keep a value or two on
    the stack outside its loops (at most FALLBACK_STACK bytes): ptxas for sm_120 does so under its own
    register cap (168); capping at 192 removes the spill but costs an occupancy step (25 % -> 16.7 %
    or 33.3 % -> 25 %), so the spill stays (bench/README.md, "Triton kernels: registers and occupancy")."""
    spilled = []
    for v in report["variants"]:
        fallback = v["kernel"] == "fused_step_kernel" and v["constexprs"].get("ALIGNED") == "False"
        in_loops = sum(loop["spills"] for loop in v["sass_loops"])
        if in_loops or v["local"] or v["stack"] > (FALLBACK_STACK if fallback else 0) or (
                v["spill_instructions"] and not fallback):
            spilled.append((v["kernel"], v["arch"], v["constexprs"], v["stack"], v["spill_instructions"], in_loops))
    assert not spilled


@pytest.mark.slow
def test_fused_step_loads_before_stores(report):
    """In every loop of the fused step, no global load follows the first global store (a store
    the compiler cannot prove independent would otherwise serialise the loads behind it)."""
    for v in fused_steps(report):
        for loop in v["sass_loops"]:
            if loop["stg"]:
                assert loop["loads_after_first_store"] == 0, (v["arch"], v["constexprs"], loop)


@pytest.mark.slow
def test_no_fma_contraction(report):
    """Every operation rounded on its own, as the reference computes: no fma.rn.f32 in the PTX
    (ptxas is also told not to fuse: enable_fp_fusion=False passes --fmad=false)."""
    fused = [(v["kernel"], v["arch"], v["ptx_fma_f32"]) for v in report["variants"]
             if v["ptx_fma_f32"] or v["enable_fp_fusion"]]
    assert not fused


@pytest.mark.slow
def test_histogram_cost_per_element_is_constant_and_small(report):
    """The window histogram adds a fixed number of instructions per element (one atomic each),
    independent of the number of bins: no ballot/popcount lowering."""
    for v in fused_steps(report, P_TYPE="fp32", S_TYPE="fp32", ALIGNED="True"):
        loops = hot_loops(v)
        with_hist = [loop["instructions"] for loop in loops if loop["global_atomics"]]
        without = [loop["instructions"] for loop in loops if not loop["global_atomics"]]
        assert with_hist and without, (v["arch"], loops)
        per_element = (min(with_hist) - min(without)) / ELEMENTS_PER_THREAD
        assert per_element <= HIST_INSTRUCTIONS_PER_ELEMENT, (v["arch"], per_element)
        assert all(loop["global_atomics"] == ELEMENTS_PER_THREAD for loop in loops if loop["global_atomics"])
    for v in report["variants"]:
        if v["kernel"] in ("fused_step_kernel", "histogram_kernel"):
            assert v["ptx_popc"] <= 4, (v["kernel"], v["arch"], v["ptx_popc"])


@pytest.mark.slow
def test_steps_that_do_not_collect_do_not_pay_for_the_histogram(report):
    """Collecting is a run-time decision (host flags or, capturable, a control word on the device),
    taken once per program: every fused-step variant has a tile loop without histogram atomics."""
    for v in fused_steps(report):
        tile_loops = [loop for loop in v["ptx_loops"] if loop["stores"]]
        assert any(loop["global_atomics"] for loop in tile_loops), (v["arch"], v["constexprs"])
        assert any(not loop["global_atomics"] for loop in tile_loops), (v["arch"], v["constexprs"])


@pytest.mark.slow
def test_fused_step_occupancy(report):
    low = [(v["arch"], v["constexprs"], v["registers"], v["occupancy"]) for v in fused_steps(report, ALIGNED="True")
           if v["occupancy"] < MIN_OCCUPANCY]
    assert not low
