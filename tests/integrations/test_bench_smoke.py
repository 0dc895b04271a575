"""The benchmark runner's quick mode works from a clean checkout (no timing assertions)."""
import json
import os
import math
import pathlib
import subprocess
import sys

import pytest

from support.devices import HAS_EXTENSION, HAS_TRITON

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_and_writes_json(tmp_path):
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--reps", "2", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    res = json.loads(path.read_text())
    assert res["machine"]["torch"] and res["config"]["quick"] is True
    kinds = {r["contender"] for r in res["steps"]}
    assert {"epi-torch", "unfused", "adamw-fused", "adamw-foreach"} <= kinds
    for r in res["steps"]:
        assert r["n"] == 2 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert math.isfinite(r["gb_per_s"]) and r["vs_adamw-fused"]["median"] > 0
    assert {r["what"] for r in res["threshold"]} >= {"refresh (torch)", "torch.kthvalue", "torch.topk"}
    # memory is a layout fact, not a timing: EPI adds fp32 scores + 1 mask bit (bf16 scores: 2 B)
    over = {(r["param_dtype"], r["optimizer"]): r["over_adamw"] for r in res["memory"]}
    for dtype in ("float32", "bfloat16"):
        assert 4.125 <= over[(dtype, "EPIAdamW, fp32 scores")] < 4.126
        assert 2.125 <= over[(dtype, "EPIAdamW, bf16 scores")] < 2.126
    assert "epi-torch" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.slow  # every kernel variant in the emulations
@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_dry_run_exercises_the_gpu_code_paths_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/run.py", "--dry", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-dry.json")
    res = json.loads(path.read_text())
    assert res["config"]["dry"] is True
    kernels = {"triton"} | ({"cuda"} if HAS_EXTENSION else set())
    assert {r["contender"] for r in res["steps"]} >= {"epi-torch", "unfused", "adamw-fused"} | {f"epi-{b}" for b in kernels}
    assert {(r["backend"], r["variant"]) for r in res["kernel_variants"]} == {
        (b, v) for b in kernels for v in ("plain", "histogram", "refresh", "repair", "device")}  # "graph": CUDA only
    assert {f"threshold kernels ({b})" for b in kernels} <= {r["what"] for r in res["threshold"]}
    assert all(r["median_ms"] > 0 for r in res["steps"] + res["kernel_variants"])


@pytest.mark.skipif(not HAS_EXTENSION, reason="the CUDA extension epi_kernels._C is not built")
def test_sanitizer_run_passes_in_the_host_harness():
    # the program device_check.sh runs under compute-sanitizer, here on CPU tensors
    proc = subprocess.run([sys.executable, "bench/cuda_sanitize.py", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "EPI_CUDA_HOST": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(" 0 mismatches" in line for line in lines)
    repaired = [int(line.split("(")[1].split()[0]) for line in lines]
    windows = [int(line.split(": ")[1].split()[0]) - r for line, r in zip(lines, repaired)]
    assert min(repaired) > 0 and min(windows) > 0  # both threshold paths ran
