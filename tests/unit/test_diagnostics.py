"""`python -m epi_kernels` reports what this installation can run."""
import subprocess
import sys

from support.devices import HAS_CUDA, HAS_EXTENSION, HAS_TRITON


def test_report_names_the_backends_and_the_extension():
    proc = subprocess.run([sys.executable, "-m", "epi_kernels"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    backends = next(line for line in out.splitlines() if line.startswith("backends available: "))
    listed = backends.removeprefix("backends available: ").split(", ")
    assert listed[:2] == ["torch", "compiled"]
    assert ("triton" in listed) == HAS_TRITON and ("cuda" in listed) == HAS_EXTENSION
    assert ("not built" in out) == (not HAS_EXTENSION)
    if HAS_EXTENSION and not HAS_CUDA:
        assert "epi_kernels._C.device_count: cuda" in out  # the CUDA error, spelled out
