"""Build script for epi_kernels.

The package is pure Python today; the CUDA extension (csrc/, python/, CMakeLists.txt) is built
here once it exists. torch is not a build requirement, so building never pulls a CUDA torch wheel:
install the torch you want first (CPU: `pip install torch==2.13.0`).
"""
from setuptools import find_packages, setup

setup(
    name="epi-kernels",
    version="0.1.0",
    description="AdamW with Evolving Parameter Isolation (EPI): fused score EMA, top-k threshold and masked step",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["epi_kernels", "epi_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.7"],
    extras_require={
        "test": ["pytest>=8", "expecttest", "numpy", "pytest-benchmark", "lightning"],
        "triton": ["triton>=3.6,<3.10"],  # the "triton" backend; 3.6 is on the GPU machine
        # python -m epi_kernels.experiments (sympy comes with torch; the shim is in experiments/data.py)
        "experiments": ["transformers>=4.50", "accelerate", "mathematics-dataset==1.0.1", "matplotlib", "tqdm"],
    },
)
