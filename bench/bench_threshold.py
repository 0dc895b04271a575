"""pytest-benchmark: the threshold engine and a whole mask refresh against torch.kthvalue / topk."""
import pytest
import torch

from epi_kernels import threshold as th
from epi_kernels.refresh import refresh_masks
from epi_kernels.state import init_epi_state

SIZES = [1 << 20, 1 << 24]


def _scores(n):
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).pow(2)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("what", ["refresh", "window", "radix", "kthvalue", "topk"])
def test_threshold(benchmark, what, n):
    s = _scores(n)
    k = th.isolation_k(0.01, n)
    keys = th.score_keys(s)
    anchor = th.radix_threshold([keys], k)
    state = {}
    init_epi_state(state, s, torch.float32)
    state["importance"] = s

    def refresh():
        state["threshold_bits"].fill_(anchor)
        refresh_masks([state], isolation_ratio=0.01, scope="tensor", threshold="approx", step=1)

    fn = {"refresh": refresh, "window": lambda: th.approx_threshold([keys], k, anchor),
          "radix": lambda: th.radix_threshold([keys], k), "kthvalue": lambda: s.kthvalue(n - k + 1),
          "topk": lambda: s.topk(k, sorted=False)}[what]
    benchmark.group = f"threshold {n}"
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
