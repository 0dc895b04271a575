"""What a run ran on: package versions, the git revision, the CPU and its instruction set, threads.

Runs are deterministic for a seed and a thread count on one machine, not across machines: another
CPU (or another torch build) may take another vectorised path through the same code and round
differently. Every results.json carries this record, and a replication (`--replicate FILE`) warns
about each field in which its environment differs from the committed file's.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# fields that differ between any two runs and say nothing about how a run computes
_INCIDENTAL = ("date", "host")
# the SIMD features that change which kernels torch and numpy pick
_SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")


_FROM_WORKERS: dict[str, str] = {}  # packages imported by the worker processes of parallel runs (train.run_many)


def add_worker_packages(packages: dict[str, str]) -> None:
    """Count what a worker process imported (the model's libraries load only there) as imported."""
    _FROM_WORKERS.update(packages)


def environment() -> dict[str, object]:
    """This process's environment: call it after the run, so every package the run imported is listed."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": imported_packages(), "git_revision": git_revision(),
            "cpu": cpu(), "torch_threads": torch.get_num_threads()}


def imported_packages() -> dict[str, str]:
    """{distribution: version} of every installed distribution a module in sys.modules comes from,
    and of those the worker processes reported."""
    owners = importlib.metadata.packages_distributions()
    names = {dist for module in list(sys.modules) for dist in owners.get(module.partition(".")[0], ())}
    out = dict(_FROM_WORKERS)
    for name in sorted(names, key=str.lower):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a stale egg-info entry
            continue
    return dict(sorted(out.items(), key=lambda item: item[0].lower()))


def git_revision() -> str | None:
    """The commit of the checkout this package runs from, '+dirty' when tracked files are modified;
    None for an installed wheel or where git is missing."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu() -> dict[str, object]:
    """The CPU's model (name and family/model/stepping, as names alone are often vague on VMs), its
    SIMD features, and the instruction set torch's CPU kernels were dispatched to."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
            "simd": [f for f in _SIMD if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cores": os.cpu_count()}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def differences(committed: dict, current: dict) -> list[str]:
    """One line per field (packages and CPU fields one by one) in which two environments differ,
    leaving out the date and host; a field missing on one side (an older results.json) counts."""
    out = []
    for key in sorted(set(committed) | set(current)):
        if key in _INCIDENTAL:
            continue
        old, new = committed.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{line}" for line in differences(old, new)]
        elif old != new:
            out.append(f"{key}: {_show(old)} -> {_show(new)}")
    return out


def _show(value) -> str:
    return "(not recorded)" if value is None else str(value)
