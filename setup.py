"""Build script for epi_kernels: pure Python plus the optional CUDA extension `epi_kernels._C`.

The extension (csrc/ + python/, see CMakeLists.txt) is built with CMake when nvcc is found:
  EPI_BUILD_CUDA=1  require it (exit with an error when nvcc is missing)
  EPI_BUILD_CUDA=0  skip it: pure-Python install, py3-none-any wheel
  unset             build it iff nvcc is found
  EPI_NVCC=path     use this nvcc and no other (a path that does not exist simulates "no toolkit")
  EPI_CUDA_ARCHS    CMAKE_CUDA_ARCHITECTURES, e.g. "90a" (default in CMakeLists.txt: 80, 90 + PTX)
torch is not a build requirement (the extension takes raw pointers), so building never pulls a CUDA
torch wheel: install the torch you want first (CPU: `pip install torch==2.13.0`).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc(env):
    """nvcc to build with, or None. EPI_NVCC, when set, is the only candidate."""
    if env.get("EPI_NVCC"):
        candidates = [env["EPI_NVCC"]]
    else:
        candidates = [os.path.join(env["CUDA_HOME"], "bin", "nvcc")] if env.get("CUDA_HOME") else []
        candidates += [shutil.which("nvcc", path=env.get("PATH", "")), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_mode(env):
    """The nvcc to build the extension with, or None for a pure-Python install (EPI_BUILD_CUDA)."""
    flag = env.get("EPI_BUILD_CUDA", "").strip().lower()
    if flag not in ("", "0", "1"):
        sys.exit(f"EPI_BUILD_CUDA must be 0, 1 or unset, not {env['EPI_BUILD_CUDA']!r}")
    if flag == "0":
        return None
    nvcc = find_nvcc(env)
    if nvcc is None and flag == "1":
        where = env["EPI_NVCC"] if env.get("EPI_NVCC") else "$CUDA_HOME/bin, PATH, /usr/local/cuda/bin"
        sys.exit(f"EPI_BUILD_CUDA=1 but nvcc was not found ({where}): install the CUDA toolkit, "
                 "set CUDA_HOME or EPI_NVCC, or use EPI_BUILD_CUDA=0")
    return nvcc


def remove_inplace_modules():
    """Delete epi_kernels/_C*.so left in the source tree by an editable CUDA build: the package
    directory is on sys.path in editable mode (and as ./epi_kernels from the repository root), so an
    old module would still import after a pure install."""
    for path in glob.glob(os.path.join(ROOT, "epi_kernels", "_C*.so")):
        os.remove(path)
        print(f"[epi_kernels] removed stale {os.path.relpath(path, ROOT)}")


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt instead of compiling with distutils."""

    nvcc = None  # set by main()

    def build_extension(self, ext):
        # A fixed directory (not build_temp, which editable installs make temporary) and a fixed
        # CMake configuration, so that repeated installs rebuild only what changed. Keyed by
        # interpreter: the module is built for one Python.
        build_dir = os.path.join(ROOT, "build", f"cmake-{sys.implementation.cache_tag}")
        if not shutil.which("cmake"):
            sys.exit("building epi_kernels._C needs cmake >= 3.24 (pip install cmake ninja), "
                     "or set EPI_BUILD_CUDA=0 for a pure-Python install")
        try:
            import pybind11  # a build requirement (pyproject.toml); needed only for the extension
        except ImportError:
            sys.exit("building epi_kernels._C needs pybind11>=2.12 (pip install pybind11)")
        archs = os.environ.get("EPI_CUDA_ARCHS")
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            # -U when unset: otherwise an EPI_CUDA_ARCHS of an earlier build stays in CMakeCache.txt.
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}" if archs else "-UCMAKE_CUDA_ARCHITECTURES",
        ]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            configure += ["-G", "Ninja"]  # the generator can only be chosen at the first configure
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        for command in (configure, ["cmake", "--build", build_dir, "--parallel", jobs]):
            if subprocess.run(command).returncode:  # CMake printed the cause above
                sys.exit(f"building epi_kernels._C failed ({command[0]} {command[1]} ...); the CUDA backend "
                         "needs it, the others do not: EPI_BUILD_CUDA=0 installs without it")
        # Hand the module to setuptools where it expects it (build_lib; an editable install then
        # copies it into epi_kernels/). Same file name: both take EXT_SUFFIX from this Python.
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, os.path.basename(target)), target)


def main():
    nvcc = cuda_mode(os.environ)
    if nvcc:
        print(f"[epi_kernels] CUDA extension epi_kernels._C enabled, nvcc: {nvcc}")
        CMakeBuild.nvcc = nvcc
    else:
        print("[epi_kernels] pure-Python install, no CUDA extension (EPI_BUILD_CUDA=0 or no nvcc)")
        remove_inplace_modules()
    setup(
        name="epi-kernels",
        version="0.1.0",
        description="AdamW with Evolving Parameter Isolation (EPI): fused score EMA, top-k threshold and masked step",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        license="BSD-3-Clause",
        license_files=["LICENSE"],
        packages=find_packages(include=["epi_kernels", "epi_kernels.*"]),
        # No ext_modules when pure: setuptools then builds a py3-none-any wheel.
        ext_modules=[Extension("epi_kernels._C", sources=[])] if nvcc else [],
        cmdclass={"build_ext": CMakeBuild},
        python_requires=">=3.10",
        install_requires=["torch>=2.7"],
        extras_require={
            # deepspeed: tests/distributed/test_deepspeed.py reads ZeRO's partition layout, pinned to the version tested
            "test": ["pytest>=8", "expecttest", "numpy", "pytest-benchmark", "lightning", "hypothesis",
                     "deepspeed==0.19.8"],
            # the "triton" backend; 3.6 is on the GPU machine. Its interpreter (TRITON_INTERPRET=1, the CPU
            # tests) needs Triton >= 3.7 or NumPy < 2.4: Triton 3.6's fails in every step with NumPy >= 2.4,
            # and backends/triton.py refuses that combination with the fix; the compiled kernels need no NumPy
            "triton": ["triton>=3.6,<3.10"],
            # python -m epi_kernels.experiments (sympy comes with torch; the shim is in experiments/data.py)
            "experiments": ["transformers>=4.50", "accelerate", "mathematics-dataset==1.0.1", "matplotlib", "tqdm"],
        },
    )


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    main()
