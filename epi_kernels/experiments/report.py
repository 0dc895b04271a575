"""Run folders, result tables, JSON and plots (matplotlib, headless)."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def log(line: str) -> None:
    """A progress line that does not break tqdm's bars."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    tqdm.write(line)


def run_folder(root: str, experiment: str) -> Path:
    folder = Path(root) / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def fmt(ms: dict[str, float], digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (prints well in a terminal and pastes into the README)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> dict[str, object]:
    import transformers  # noqa: PLC0415

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "host": platform.node()}


def write(folder: Path, results: dict, text: str) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    (folder / "results.md").write_text(text + "\n")


def pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt
