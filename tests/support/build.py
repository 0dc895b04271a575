"""The build artefacts the tests read: setup.py as a module, cuobjdump, and the release wheel
(.ci/build-wheel), which is built once per test session where a CUDA toolkit is found, or taken
from EPI_RELEASE_WHEEL (a .whl, or a folder holding one)."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import time
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# what .ci/build-wheel must put in the wheel: a cubin each, and PTX for GPUs newer than the last
RELEASE_ARCHS = ["sm_80", "sm_90", "sm_100", "sm_120"]
RELEASE_PTX = "sm_120"


def load_setup():
    """setup.py as a module: its setup() call runs only as __main__, so importing has no effect."""
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("epi_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump():
    """The toolkit's cuobjdump ($CUDA_HOME/bin, next to nvcc, /usr/local/cuda/bin, PATH), else the one
    Triton's NVIDIA backend ships (found without importing Triton); None where there is neither."""
    candidates = [os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump")] if os.environ.get("CUDA_HOME") else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.join(os.path.dirname(p), "cuobjdump") for p in (nvcc, os.path.realpath(nvcc))]
    candidates += ["/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(list(triton.submodule_search_locations)[0], "backends", "nvidia", "bin",
                                       "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


class ReleaseWheel:
    """The wheel file, the seconds its build took (None when given) and its extension module, unpacked."""

    def __init__(self, path: pathlib.Path, build_seconds, workdir: pathlib.Path):
        self.path, self.build_seconds = path, build_seconds
        with zipfile.ZipFile(path) as whl:
            self.names = whl.namelist()
            modules = [n for n in self.names if n.startswith("epi_kernels/_C.") and n.endswith(".so")]
            assert len(modules) == 1, f"{path.name}: expected one epi_kernels/_C*.so, found {modules}"
            self.module = pathlib.Path(whl.extract(modules[0], workdir / "unpacked"))


def release_wheel(workdir: pathlib.Path) -> ReleaseWheel:
    """The release wheel: EPI_RELEASE_WHEEL, else built into `workdir` by .ci/build-wheel. Skips where
    no CUDA toolkit is found; a build that fails is a test failure (a target that does not compile)."""
    given = os.environ.get("EPI_RELEASE_WHEEL")
    if given:
        path = pathlib.Path(given)
        wheels = sorted(path.glob("*.whl")) if path.is_dir() else [path]
        assert len(wheels) == 1 and wheels[0].is_file(), f"EPI_RELEASE_WHEEL={given}: not one wheel: {wheels}"
        return ReleaseWheel(wheels[0], None, workdir)
    if os.environ.get("EPI_BUILD_CUDA") == "0" or load_setup().find_nvcc(os.environ) is None:
        pytest.skip("no CUDA toolkit here (or EPI_BUILD_CUDA=0): the release wheel (.ci/build-wheel) is not built")
    out = workdir / "dist"
    start = time.monotonic()
    build = subprocess.run(["bash", str(ROOT / ".ci" / "build-wheel"), str(out)], capture_output=True, text=True,
                           timeout=1800)
    if build.returncode:
        pytest.fail(f".ci/build-wheel failed (rc {build.returncode}):\n{(build.stdout + build.stderr)[-6000:]}")
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return ReleaseWheel(wheels[0], time.monotonic() - start, workdir)
