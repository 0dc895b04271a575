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


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    for cmd in ("pip install torch==2.13.0", 'pip install -e ".[test,triton,experiments]"',
                "pip install --no-deps --target .triton-3.6 triton==3.6.0", "EPI_TRITON_EXTRA=$PWD/.triton-3.6 python -m pytest"):
        assert cmd in README.read_text() and cmd in ci, cmd
