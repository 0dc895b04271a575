"""The README's usage example runs as written and does what it says."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope = {}
    exec(compile(block, str(README), "exec"), scope)
    stats, mask = scope["opt"].isolation_stats()[0], scope["mask"]
    assert mask.shape == (64, 64) and mask.dtype == torch.bool
    assert stats["k"] == int(0.05 * 64 * 64) and abs(stats["selected"] - stats["k"]) <= 4
    assert int(mask.sum()) == stats["selected"]
    assert [s["name"] for s in scope["opt"].isolation_stats()] == [n for n, _ in scope["model"].named_parameters()]


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    for cmd in ("pip install torch==2.13.0", 'pip install -e ".[test,triton,experiments]"',
                "pip install --no-deps --target .triton-3.6 triton==3.6.0", "EPI_TRITON_EXTRA=$PWD/.triton-3.6 python -m pytest"):
        assert cmd in README.read_text() and cmd in ci, cmd


def test_the_license_ships_with_the_package_metadata():
    from importlib import metadata

    assert (README.parent / "LICENSE").read_text().startswith("BSD 3-Clause License")
    meta = metadata.metadata("epi-kernels")  # what pip installed from setup.py
    assert "BSD-3-Clause" in (meta.get("License-Expression") or meta.get("License") or "")
    assert any(f.name == "LICENSE" for f in metadata.files("epi-kernels") or ())
