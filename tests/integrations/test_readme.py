"""The README's usage example runs as written and does what it says; its commands are CI's; the
documentation's relative links resolve."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


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
    """The README's two commands are what CI runs, and they do what the README says."""
    readme = README.read_text()
    ci = ROOT / ".ci"
    for cmd in ("bash .ci/setup", "bash .ci/test"):
        assert cmd in readme, cmd
    run = [line.strip() for line in (ci / "run").read_text().splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
    assert run[-1] == "bash .ci/setup && bash .ci/test", run
    assert not any(".ci/" in line or "pip " in line or "pytest" in line for line in run[:-1]), run
    setup, test = (ci / "setup").read_text(), (ci / "test").read_text()
    for cmd in ("pip install torch==2.13.0", 'pip install -e ".[test,triton,experiments]"',
                "pip install --no-deps --target .triton-3.6 triton==3.6.0"):
        assert cmd in setup, cmd
    # the pinned torch first, then the pure-install check, before the editable install (see .ci/setup)
    assert (setup.index("pip install torch==2.13.0") < setup.index("EPI_BUILD_CUDA=0 pip install")
            < setup.index('pip install -e ".[test,triton,experiments]"')), "install order"
    assert 'EPI_TRITON_EXTRA=$PWD/.triton-3.6 python -m pytest "$@"' in test
    for fact in ("torch==2.13.0", '".[test,triton,experiments]"', "EPI_TRITON_EXTRA=$PWD/.triton-3.6 python -m pytest"):
        assert fact in readme, fact


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_the_license_ships_with_the_package_metadata():
    from importlib import metadata

    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    meta = metadata.metadata("epi-kernels")  # what pip installed from setup.py
    assert "BSD-3-Clause" in (meta.get("License-Expression") or meta.get("License") or "")
    assert any(f.name == "LICENSE" for f in metadata.files("epi-kernels") or ())


DOCS = ("README.md", "DESIGN.md", "bench/README.md", "epi_kernels/experiments/README.md", "csrc/README.md",
        "python/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


def _relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images of `text` outside code, without #anchors; http(s),
    mailto and in-page links left out."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", text, flags=re.M)  # reference definitions
    out = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_relative_links_point_to_files_that_exist():
    assert "docs/README.md" in DOCS and "docs/api.md" in DOCS and "docs/integrations.md" in DOCS
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        assert path.is_file(), doc
        for target in _relative_links(path.read_text()):
            if not (path.parent / target).exists():
                broken.append(f"{doc}: {target}")
    assert not broken, broken


def test_the_link_check_finds_links():
    text = ("[a](x.md) ![b](img/y.png) [c](https://e.org/z) [d](#here) [e](f.md#sec)\n"
            "`[g](in_code.md)`\n```\n[h](in_block.md)\n```\n[r]: ref/t.md\n")
    assert _relative_links(text) == ["x.md", "img/y.png", "f.md", "ref/t.md"]
