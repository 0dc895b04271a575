"""The Triton and NumPy versions the "triton" backend runs with in Triton's interpreter.

setup.py's extra "triton" allows Triton 3.6 to 3.9 (3.6 is the GPU machine's). Triton's interpreter
before 3.7 cannot run with NumPy >= 2.4: it converts a loop bound read from memory with int() of a
1-element array, a TypeError since NumPy 2.4 (Triton 3.7 squeezes first). That combination is
refused at the step's device check, with the versions and the fix named; every other one steps
as the "torch" reference does. Each case runs in a subprocess: the Triton it imports is chosen by
PYTHONPATH (.triton-3.6: the GPU machine's, installed there by .ci/setup), with this environment's
NumPy.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from epi_kernels.backends.triton import interpreter_version_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRITON_36 = os.path.join(ROOT, ".triton-3.6")

# 3 steps of one tensor of 300 elements (a partial tile, a refresh every step) under the triton
# and torch backends; prints the versions and either the outcome or the refusal as JSON
SCRIPT = r"""
import json, sys
import numpy, torch, triton
from epi_kernels import EPIAdamW

def run(backend):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, generator=gen))
    start = p.detach().clone()
    opt = EPIAdamW([p], lr=1e-2, backend=backend, isolation_ratio=0.1, refresh_interval=1)
    for _ in range(3):
        p.grad = torch.randn(300, generator=gen)
        try:
            opt.step()
        except RuntimeError as e:
            return {"error": str(e), "untouched": torch.equal(p.detach(), start) and not opt.state[p]}
    return {"param": p.detach().clone(), "mask": opt.isolation_mask(p).clone(),
            "score": opt.state[p]["importance"].clone()}

out = {"triton": triton.__version__, "triton_file": triton.__file__, "numpy": numpy.__version__}
got, ref = run("triton"), run("torch")
if "error" in got:
    out.update(error=got["error"], untouched=got["untouched"])
else:
    out.update(isolated=int(got["mask"].sum()), masks_equal=torch.equal(got["mask"], ref["mask"]),
               scores_equal=torch.equal(got["score"], ref["score"]),
               param_diff=(got["param"] - ref["param"]).abs().max().item())
print("RESULT " + json.dumps(out))
"""


def release(version):
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.4.0rc1", True), ("3.6.0+git9f2a", "3.0.0", True),
    ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False),
    ("3.7.0", "2.4.6", False), ("3.9.0", "2.4.6", False), ("3.10.0", "2.4.0", False),
])
def test_version_gate(triton_version, numpy_version, refused):
    why = interpreter_version_error(triton_version, numpy_version)
    assert (why is not None) == refused
    if refused:
        for text in (triton_version, numpy_version, 'pip install "numpy<2.4"', "triton>=3.7"):
            assert text in why


@pytest.mark.parametrize("installation", ["installed", "triton-3.6"])
def test_interpreter_step_or_clear_refusal(installation):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    path = [ROOT, os.environ.get("PYTHONPATH")]
    if installation == "installed":
        pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[triton])")
    else:
        if not os.path.isdir(os.path.join(TRITON_36, "triton")):
            pytest.skip(f"{TRITON_36} is absent (bash .ci/setup installs Triton 3.6.0 there)")
        path.insert(0, TRITON_36)
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"the subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = json.loads(results[0])
    if installation == "triton-3.6":
        assert out["triton"] == "3.6.0" and out["triton_file"].startswith(TRITON_36), out
    if release(out["triton"]) < (3, 7) and release(out["numpy"]) >= (2, 4):
        assert "error" in out, f"Triton {out['triton']} with NumPy {out['numpy']} should be refused: {out}"
        for text in (f"Triton {out['triton']}", f"NumPy {out['numpy']}", 'pip install "numpy<2.4"', "triton>=3.7"):
            assert text in out["error"]
        assert out["untouched"], "refused after the step had changed the parameter or its state"
    else:
        assert "error" not in out, f"Triton {out['triton']} with NumPy {out['numpy']}: {out['error']}"
        assert out["isolated"] == 30 and out["masks_equal"] and out["scores_equal"], out
        assert out["param_diff"] < 1e-6, out


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.9.0", "2.4.6", False), ("3.6.0", None, None),
])
def test_python_m_epi_kernels_says_whether_the_interpreter_runs(monkeypatch, triton_version, numpy_version, refused):
    """The installation report (python -m epi_kernels, asked for in bug reports) names the versions
    and the fix where the interpreter cannot run, whether or not Triton is installed here."""
    from epi_kernels import __main__ as cli

    versions, real_version, real_find = {"triton": triton_version, "numpy": numpy_version}, \
        importlib.metadata.version, importlib.util.find_spec

    def version(name):
        if name not in versions:
            return real_version(name)
        if versions[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real_find(name, *a))
    lines = [line for line in cli.report() if line.startswith("Triton's interpreter")]
    assert len(lines) == 1, cli.report()
    if refused is None:
        assert "NumPy" in lines[0] and "not installed" in lines[0]
    elif refused:
        for text in (f"Triton {triton_version}", f"NumPy {numpy_version}", 'pip install "numpy<2.4"', "triton>=3.7"):
            assert text in lines[0]
    else:
        assert lines[0].endswith(f"runs with NumPy {numpy_version}")
