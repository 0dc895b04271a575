"""The release wheel (.ci/build-wheel): what it contains, which platforms it claims, and that it
installs and runs where there is no CUDA toolkit, under more than one torch.

The wheel is built once per session (tests/support/build.py; EPI_RELEASE_WHEEL to give one), which
needs a CUDA toolkit here; without one these tests skip with that reason. Its SASS properties are
checked with the installed module's in test_cuda_sass.py.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from support.build import RELEASE_ARCHS, RELEASE_PTX, ROOT, find_cuobjdump

pytestmark = pytest.mark.slow  # the build (about 2 minutes on 2 cores) and fresh virtual environments

# what the module may need at run time: the C and C++ runtimes, which every manylinux policy allows
ALLOWED_NEEDED = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                  "libpthread.so.0", "libdl.so.2", "librt.so.1"}
# the torch builds it must run with, unbuilt: the pinned CPU one and a CUDA 13 one (which loads its
# own shared CUDA runtime beside the module's static one), both from the package index or its cache
TORCHES = [pytest.param("torch==2.13.0", id="torch-2.13.0-cpu"), pytest.param("torch==2.14.1", id="torch-2.14.1-cu130")]


def dynamic_section(module):
    """(NEEDED libraries, highest GLIBC_x.y symbol version) of an ELF shared object, from objdump."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    headers = subprocess.run([objdump, "-p", str(module)], capture_output=True, text=True, check=True).stdout
    symbols = subprocess.run([objdump, "-T", str(module)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"^\s*NEEDED\s+(\S+)", headers, re.M))
    glibc = max(tuple(map(int, v.split("."))) for v in re.findall(r"\bGLIBC_(\d+\.\d+(?:\.\d+)?)\b", symbols))
    return needed, glibc


def test_wheel_is_a_manylinux_wheel_that_needs_only_the_c_runtimes(release_wheel):
    name = release_wheel.path.name
    m = re.fullmatch(r"epi_kernels-[\w.]+-cp(\d+)-cp\1-manylinux_(\d+)_(\d+)_x86_64\.whl", name)
    assert m, f"not a manylinux CPython wheel: {name}"
    assert m.group(1) == f"{sys.version_info.major}{sys.version_info.minor}", name
    assert not [n for n in release_wheel.names if n.startswith("epi_kernels.libs/")], "auditwheel bundled libraries"
    needed, glibc = dynamic_section(release_wheel.module)
    assert needed <= ALLOWED_NEEDED, f"the module needs {sorted(needed - ALLOWED_NEEDED)} (CUDA runtime, torch?)"
    tag = (int(m.group(2)), int(m.group(3)))
    assert glibc <= tag, f"the module needs glibc {glibc} but the wheel claims manylinux_{tag[0]}_{tag[1]}"
    # the oldest glibc the toolchain here reaches (csrc/README.md "The release wheel" says why): a change is news
    assert tag == (2, 34), f"manylinux_{tag[0]}_{tag[1]}: update README.md and csrc/README.md"


def test_wheel_has_a_cubin_for_every_release_target_and_ptx_for_newer_gpus(release_wheel):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit bin/ or the triton wheel)")
    elf = subprocess.run([cuobjdump, "--list-elf", str(release_wheel.module)], capture_output=True, text=True,
                         check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(release_wheel.module)], capture_output=True, text=True,
                         check=True).stdout
    assert sorted(set(re.findall(r"\.(sm_\d+)\.cubin", elf))) == sorted(RELEASE_ARCHS), elf
    assert set(re.findall(r"\.(sm_\d+)\.ptx", ptx)) == {RELEASE_PTX}, ptx


def toolkit_free_env(venv: pathlib.Path) -> dict:
    """The environment of a user without CUDA: the venv and the system's bin folders on PATH, no
    CUDA_HOME/LD_LIBRARY_PATH, none of this repository's or the test session's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CUDA", "EPI_", "TRITON_", "PYTHON", "PYTEST", "VIRTUAL_ENV", "LD_"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    for tool in ("nvcc", "ptxas", "cuobjdump"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} on the toolkit-free PATH"
    return env


def make_venv(path: pathlib.Path, *requirements: str) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    env = toolkit_free_env(path)
    for reqs in requirements:  # in order: torch before the wheel, so that its dependency is already met
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *reqs.split()], env=env,
                       check=True, timeout=1200)
    return env


CHECK_INSTALL = """
import json, epi_kernels, epi_kernels._C as C, torch
print(json.dumps({"package": epi_kernels.__file__, "module": C.__file__, "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda}))
"""
# the host-harness parity: the extension's per-element and threshold code on CPU tensors against the
# pure-PyTorch reference (EPI_CUDA_HOST, set by conftest.py without a GPU)
PARITY = ["tests/backends/test_cuda_extension.py", "tests/backends/test_kernel_backends.py"]


@pytest.mark.parametrize("torch_requirement", TORCHES)
def test_wheel_installs_and_passes_the_host_harness_parity_without_a_toolkit(release_wheel, tmp_path,
                                                                            torch_requirement):
    venv = tmp_path / "venv"
    try:
        check_installed_wheel(release_wheel, tmp_path, venv, torch_requirement)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # up to 5 GB with a CUDA torch


def check_installed_wheel(release_wheel, tmp_path, venv, torch_requirement):
    env = make_venv(venv, torch_requirement, f"{release_wheel.path} pytest hypothesis numpy")
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", CHECK_INSTALL], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert site.returncode == 0, site.stderr[-3000:]
    where = json.loads(site.stdout.splitlines()[-1])
    assert where["package"].startswith(str(venv)) and where["module"].startswith(str(venv)), where
    assert where["torch"] == torch_requirement.split("==")[1].split("+")[0] or \
        where["torch"].startswith(torch_requirement.split("==")[1] + "+"), where
    # the tests from a copy: from the repository root, `import epi_kernels` would find the source tree
    suite = tmp_path / "suite"
    for part in ("tests/conftest.py", "tests/support", "bench/__init__.py", "bench/thresholds.py", *PARITY):
        (suite / part).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, suite / part)
    (suite / "pytest.ini").write_text("[pytest]\npythonpath = . tests\naddopts = -p no:cacheprovider\n"
                                      "markers =\n    gpu\n    slow\n    distributed\n")
    run = subprocess.run([python, "-m", "pytest", "-q", "-k", "not triton and not cpu-interpreter", *PARITY],
                         env=env, cwd=suite, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 40 and "failed" not in summary, summary  # 44 host-harness cases when this was written


def test_module_loads_without_torch(release_wheel, tmp_path):
    """The extension links no torch and includes no torch header: it loads with no torch at all, and
    its static CUDA runtime answers (no driver here: an error, not a crash)."""
    venv = tmp_path / "venv"
    env = make_venv(venv, f"--no-deps {release_wheel.path}")
    probe = """
import glob, importlib.util, json, sys
path, = glob.glob(sys.prefix + "/lib/python*/site-packages/epi_kernels/_C*.so")
spec = importlib.util.spec_from_file_location("epi_kernels._C", path)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
try:
    devices = C.device_count()
except RuntimeError as e:
    devices = str(e)
print(json.dumps({"torch": "torch" in sys.modules, "constants": C.constants(), "devices": devices}))
"""
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["torch"] is False
    assert result["constants"]["THREADS"] == 256, result["constants"]
    assert isinstance(result["devices"], int) or "cudaError" in result["devices"], result["devices"]
