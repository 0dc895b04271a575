"""Build system of the optional CUDA extension epi_kernels._C (setup.py + CMakeLists.txt).

The mode logic of setup.py is unit-tested on fake nvcc files. The built module is checked when this
machine has nvcc: then `pip install -e .` must have built it (static cudart, sm_80 + sm_90 code)."""
import importlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from support.build import ROOT, find_cuobjdump, load_setup


@pytest.fixture
def fake_nvcc(tmp_path):
    path = tmp_path / "cuda" / "bin" / "nvcc"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_mode_from_env(fake_nvcc, tmp_path):
    mode = load_setup().cuda_mode
    missing = str(tmp_path / "missing" / "nvcc")
    assert mode({"EPI_BUILD_CUDA": "0", "EPI_NVCC": fake_nvcc}) is None
    assert mode({"EPI_NVCC": fake_nvcc}) == fake_nvcc
    assert mode({"EPI_BUILD_CUDA": "1", "EPI_NVCC": fake_nvcc}) == fake_nvcc
    assert mode({"EPI_NVCC": missing, "CUDA_HOME": str(tmp_path / "cuda")}) is None  # EPI_NVCC only
    with pytest.raises(SystemExit, match="EPI_BUILD_CUDA=1 but nvcc was not found"):
        mode({"EPI_BUILD_CUDA": "1", "EPI_NVCC": missing})
    with pytest.raises(SystemExit, match="must be 0, 1 or unset"):
        mode({"EPI_BUILD_CUDA": "yes"})


def test_nvcc_search_order(fake_nvcc, tmp_path):
    find = load_setup().find_nvcc
    on_path = tmp_path / "path" / "nvcc"
    on_path.parent.mkdir()
    shutil.copy(fake_nvcc, on_path)
    cuda_home = str(pathlib.Path(fake_nvcc).parents[1])
    assert find({"CUDA_HOME": cuda_home, "PATH": str(on_path.parent)}) == fake_nvcc
    assert find({"CUDA_HOME": str(tmp_path / "none"), "PATH": str(on_path.parent)}) == str(on_path)
    os.chmod(fake_nvcc, 0o644)  # not executable: not a toolchain
    assert find({"EPI_NVCC": fake_nvcc}) is None


def test_pure_build_removes_inplace_module(tmp_path, monkeypatch):
    """Switching an editable install to pure must not leave the old module importable."""
    setup_py = load_setup()
    (tmp_path / "epi_kernels").mkdir()
    stale = tmp_path / "epi_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    keep = tmp_path / "epi_kernels" / "other.so"
    stale.write_bytes(b"")
    keep.write_bytes(b"")
    monkeypatch.setattr(setup_py, "ROOT", str(tmp_path))
    setup_py.remove_inplace_modules()
    assert not stale.exists() and keep.exists()


def test_pure_wheel_is_py3_none_any(tmp_path):
    """EPI_BUILD_CUDA=0 builds a platform-independent wheel without the extension (about 4 s).
    Built from a copy: a pure build deletes epi_kernels/_C*.so of the tree it runs in."""
    pytest.importorskip("setuptools.command.bdist_wheel", reason="needs setuptools>=70.1 (bdist_wheel)")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.so", "__pycache__", "*.egg-info",
                                                             "bench", "tests"))
    env = dict(os.environ, EPI_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=env)
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["epi_kernels-0.1.0-py3-none-any.whl"]


def test_cmake_sets_architectures_before_project():
    """After project(), CMake has already chosen nvcc's default (sm_75) and a default set later is
    ignored: the build would silently lack sm_80/sm_90 code."""
    text = (ROOT / "CMakeLists.txt").read_text()
    default = re.search(r'^\s*set\(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual"', text, re.M)
    assert default and default.start() < re.search(r"^project\(", text, re.M).start()


# --- the built extension: required when this machine can build it ---------------------------------

def built_module():
    if os.environ.get("EPI_BUILD_CUDA") == "0":
        pytest.skip("EPI_BUILD_CUDA=0: pure-Python install requested")
    nvcc = load_setup().find_nvcc(os.environ)
    if nvcc is None:
        pytest.skip("no nvcc on this machine: the CUDA extension is not built (pure-Python install)")
    try:
        return importlib.import_module("epi_kernels._C")
    except ImportError as e:
        pytest.fail(f"nvcc is at {nvcc} but epi_kernels._C does not import ({e}): "
                    "reinstall with `pip install -e .` (EPI_BUILD_CUDA=1 to see build errors)")


def test_device_count_is_positive_or_raises():
    """cudaGetDeviceCount fails without a driver or GPU: _C must raise, never report 0 devices."""
    C = built_module()
    try:
        n = C.device_count()
    except RuntimeError as e:
        assert "device_count: cudaError" in str(e), e
        assert not torch.cuda.is_available(), f"torch sees a GPU but _C raised {e}"
    else:
        assert isinstance(n, int) and n >= 1, n
        if torch.cuda.is_available():
            assert n == torch.cuda.device_count()


def test_cudart_is_static():
    """A shared libcudart would make the module unimportable where the toolkit is not installed."""
    so = built_module().__file__
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    out = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in out, out


def test_fatbin_has_sm80_and_sm90():
    so = built_module().__file__
    if os.environ.get("EPI_CUDA_ARCHS"):
        pytest.skip(f"EPI_CUDA_ARCHS={os.environ['EPI_CUDA_ARCHS']} overrides the default architectures")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit bin/ or the triton wheel)")
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf, elf
    assert ".sm_90.ptx" in ptx, ptx  # PTX for GPUs newer than sm_90
