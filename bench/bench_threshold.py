"""pytest-benchmark: a whole mask refresh and the threshold engine against torch.kthvalue / topk."""
import pytest

from bench import common
from epi_kernels import backends

SIZES = [1 << 20, 1 << 24]
WHAT = [f"refresh ({b})" for b in common.runnable_backends("cpu") if not backends.get(b).refreshes_in_step] + [
    "window threshold", "radix threshold (repair)", "torch.kthvalue", "torch.topk"]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("what", WHAT)
def test_threshold(benchmark, what, n):
    fn = common.threshold_contenders(n, "cpu", common.runnable_backends("cpu"))[what]
    benchmark.group = f"threshold {n}"
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
