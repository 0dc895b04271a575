"""The one-call GPU check (bench/device_check.sh) and its benchmark (bench/gpu_bench.py) in their
dry mode: the same stages and code on CPU tensors (Triton's interpreter, the CUDA extension's host
harness), so nothing in them fails for the first time on the scarce GPU. No timing assertions
beyond "measured, finite, positive": the dry timings mean nothing."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from support.devices import HAS_EXTENSION, HAS_TRITON

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGE_FILES = {"check.log", "bench.log", "gpu_bench.json", "gpu_bench.md", "tests.log", "sanitizer.log",
               "memory.log", "memory.json"}
CONTENDERS = {("adamw-fused", "normal"), ("epi-cuda", "normal"), ("epi-triton", "normal"), ("epi-cuda-v", "normal"),
              ("epi-triton-v", "normal"), ("epi-cuda", "refresh"), ("epi-triton", "refresh"),
              ("epi-cuda-global", "refresh"), ("epi-triton-global", "refresh")}
# bench/gpu_bench.py run as if the extension had not been built (a failed build on the GPU machine):
# importlib finds no module that sys.modules maps to None, so backend="cuda" is unavailable
WITHOUT_EXTENSION = ("import runpy, sys; sys.modules['epi_kernels._C'] = None; sys.argv[0] = 'bench/gpu_bench.py'; "
                     "runpy.run_path('bench/gpu_bench.py', run_name='__main__')")

pytestmark = [
    pytest.mark.slow,  # about 2 minutes on 2 cores: every kernel step and the graph check emulated
    pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed (the dry run steps backend='triton' in its interpreter)"),
    pytest.mark.skipif(not HAS_EXTENSION, reason="the CUDA extension epi_kernels._C is not built (the dry run steps "
                                                 "backend='cuda' in its host harness)"),
]


def _bench(*args, code=None, timeout=600):
    cmd = [sys.executable, *(["-c", code] if code else ["bench/gpu_bench.py"]), "--dry", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _finite_positive(*xs):
    return all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in xs)


@pytest.fixture(scope="module")
def dry_check(tmp_path_factory):
    """One dry run of the whole script: (its process, its $OUT)."""
    out = tmp_path_factory.mktemp("device-check")
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    return proc, out


def test_every_stage_runs_and_leaves_at_most_8_files(dry_check):
    proc, out = dry_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == STAGE_FILES and len(files) <= 8
    log = (out / "check.log").read_text()
    for stage in ("versions", "bench", "tests", "memory"):
        assert f"== {stage}: ok in " in log, log
    assert "== build: skipped (DRY=1" in log and "epi_kernels._C" in log
    tests = (out / "tests.log").read_text()
    assert " passed" in tests and "FAILED" not in tests and " failed" not in tests
    memory = json.loads((out / "memory.json").read_text())
    assert {r["config"] for r in memory["rows"]} == {"adamw", "torch"}
    assert "| epi-cuda | normal |" in proc.stdout  # the table ends the output (what a caller sees of it)


def test_every_contender_dtype_and_case_is_measured(dry_check):
    _, out = dry_check
    res = json.loads((out / "gpu_bench.json").read_text())
    assert res["complete"] is True and res["config"]["dry"] is True and res["config"]["cuda_events"] is False
    assert res["machine"]["torch"] and "git_rev" in res["machine"]
    assert res["backends"] == {"cuda": "available", "triton": "available"}
    cases = {c["name"]: c for c in res["config"]["cases"]}
    assert len(cases) == 2 and {c["tensors"] for c in cases.values()} == {1, 11}
    expected = {(case, dtype, *c) for case in cases for dtype in ("float32", "bfloat16") for c in CONTENDERS}
    got = [(r["case"], r["dtype"], r["contender"], r["step"]) for r in res["steps"]]
    assert sorted(got) == sorted(expected)  # each exactly once
    steps = res["config"]["steps"]
    for r in res["steps"]:
        assert r["status"] == "measured", r
        assert r["n"] == steps >= 2 and r["host"]["n"] == steps
        assert _finite_positive(r["min_ms"], r["median_ms"], r["max_ms"], r["gb_per_s"], r["pct_of_copy"],
                                r["copy_median_ms"], r["host"]["median_ms"], r["vs_adamw-fused"]["median"])
        # (common.summary's quartiles extrapolate from 2 samples: they may lie outside min..max)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["tensors"] == cases[r["case"]]["tensors"] and r["numel"] == cases[r["case"]]["numel"]
    # the bytes model: fp32 AdamW 28 B, EPI 36.125 B, exp_avg_sq scores 28.125 B
    per_element = {(r["contender"], r["step"]): r["bytes_per_element"] for r in res["steps"] if r["dtype"] == "float32"}
    assert per_element["adamw-fused", "normal"] == 28 and per_element["epi-cuda", "refresh"] == 36.125
    assert per_element["epi-triton-v", "normal"] == 28.125
    assert [c["seconds"] > 0 for c in res["cases_run"]] == [True] * 4


def test_the_markdown_table_has_a_row_per_result(dry_check):
    _, out = dry_check
    md = (out / "gpu_bench.md").read_text()
    res = json.loads((out / "gpu_bench.json").read_text())
    assert md.startswith("# gpu_bench: ") and "DRY RUN" in md and "INCOMPLETE" not in md
    for r in res["steps"]:
        row = f"| {r['case']} | {r['tensors']} | {r['dtype']} | {r['contender']} | {r['step']} | {r['median_ms']:.3f} |"
        assert row in md
    assert md.count("| pass |") == 4


def test_graph_check_passes_for_both_kernel_backends(dry_check):
    _, out = dry_check
    checks = json.loads((out / "gpu_bench.json").read_text())["graph_check"]
    assert {(g["backend"], g["dtype"]) for g in checks} == {(b, d) for b in ("cuda", "triton")
                                                            for d in ("float32", "bfloat16")}
    for g in checks:
        assert g["status"] == "measured" and g["passed"] is True, g
        assert g["mode"].startswith("capturable steps, no graph") and g["steps"] == 12
        assert set(g["differences"]) == {"eager capturable=True", "eager capturable=False"}


def test_without_the_extension_triton_and_torch_still_run(tmp_path):
    # a failed build on the GPU machine: the cuda rows say why, the others are measured
    _bench("--cases", "dry-1K", "--out", str(tmp_path), code=WITHOUT_EXTENSION)
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert res["backends"]["cuda"].startswith("backend 'cuda' not available") and res["backends"]["triton"] == "available"
    assert len(res["steps"]) == 2 * len(CONTENDERS)
    for r in res["steps"]:
        if r["backend"] == "cuda":
            assert r["status"] == "unavailable" and "extension" in r["why"]
        else:
            assert r["status"] == "measured" and _finite_positive(r["median_ms"])
    assert len(res["graph_check"]) == 4
    for g in res["graph_check"]:
        assert (g["status"], g["passed"]) == (("unavailable", None) if g["backend"] == "cuda" else ("measured", True))
    assert "unavailable: backend 'cuda' not available" in (tmp_path / "gpu_bench.md").read_text()


def test_cases_past_the_time_budget_are_skipped_and_say_so(tmp_path):
    proc = _bench("--budget-s", "0", "--no-graph-check", "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert res["complete"] is True and res["graph_check"] == [] and res["cases_run"] == []
    assert len(res["steps"]) == 2 * 2 * len(CONTENDERS)
    assert all(r["status"] == "skipped" and r["why"].startswith("time box") for r in res["steps"])
    assert "skipped (time box)" in proc.stdout
