"""scope="global"'s divisor (epi_kernels/normalise.py): the exponent sums are the exact sum of a
tensor's finite scores (checked against Python fractions of every element), any order and any
split of the elements gives the same integers and so the same fp32 mean, and the mean is the
correctly rounded fp32 of the exact mean or one of its neighbours (an fp64 sum of non-negative
terms loses at most a few fp64 ulps)."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epi_kernels import threshold as th
from epi_kernels.normalise import exponent_sums, mean_of_sums

FP32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)  # keys read |s|


def exact_sum(scores: torch.Tensor) -> Fraction:
    return sum((abs(Fraction(x)) for x in scores.double().tolist() if math.isfinite(x)), Fraction(0))


def weight(e: int) -> Fraction:
    return Fraction(2) ** (max(e, 1) - 150)


def fp32_neighbours(x: Fraction) -> set[float]:
    """The fp32 nearest to x and the fp32 on each side of it."""
    nearest = np.float32(float(x))
    return {float(nearest), float(np.nextafter(nearest, np.float32(np.inf))),
            float(np.nextafter(nearest, np.float32(0)))}


def mixed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g).exp_() ** 4 * 10.0 ** torch.randint(-38, 30, (n,), generator=g).float()
    s[torch.rand(n, generator=g) < 0.05] = 0.0
    s[torch.rand(n, generator=g) < 0.02] = 3e-43  # denormals
    s[torch.randint(0, n, (2,), generator=g)] = float("nan")
    s[torch.randint(0, n, (2,), generator=g)] = float("inf")
    return s


@settings(max_examples=200, deadline=None)
@given(values=st.lists(FP32, min_size=0, max_size=300), cut=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_exponent_sums_are_the_exact_sum_in_any_order_and_split(values, cut, seed):
    s = torch.tensor(values, dtype=torch.float32)
    sums = exponent_sums(s)
    assert sums.dtype == torch.int64 and sums.shape == (256,) and int(sums[255]) == 0
    assert sum(Fraction(int(m)) * weight(e) for e, m in enumerate(sums.tolist())) == exact_sum(s)
    perm = s[torch.randperm(s.numel(), generator=torch.Generator().manual_seed(seed))]
    at = int(cut * s.numel())
    assert torch.equal(exponent_sums(perm), sums)
    assert torch.equal(exponent_sums(perm[:at]) + exponent_sums(perm[at:]), sums)
    if exact_sum(s) and s.numel():
        assert mean_of_sums(sums, s.numel()) in fp32_neighbours(exact_sum(s) / s.numel())


@pytest.mark.parametrize("n,seed", [(1, 0), (1000, 1), (70_000, 2)])
def test_mixed_magnitudes_split_in_slices_give_the_mean_of_the_whole(monkeypatch, n, seed):
    s = mixed(n, seed)
    whole = exponent_sums(s)
    monkeypatch.setattr(th, "SLICE", 128)
    assert torch.equal(exponent_sums(s), whole)
    exact = exact_sum(s)
    assert exact == 0 or mean_of_sums(whole, n) in fp32_neighbours(exact / n)


def test_bf16_scores_are_widened_first():
    s = mixed(3000, 3).to(torch.bfloat16)
    sums = exponent_sums(s)
    assert sum(Fraction(int(m)) * weight(e) for e, m in enumerate(sums.tolist())) == exact_sum(s.float())


def test_means_by_hand():
    sums = exponent_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean_of_sums(sums, 4) == 2.5
    # three of the smallest denormal (2**-149) over 4 elements: 0.75 * 2**-149 rounds up to 2**-149
    sums = exponent_sums(torch.tensor([2.0 ** -149] * 3 + [float("nan")]))
    assert sums[0] == 3 and mean_of_sums(sums, 4) == 2.0 ** -149
    assert mean_of_sums(exponent_sums(torch.zeros(5)), 5) == 0.0
    assert mean_of_sums(torch.zeros(256, dtype=torch.int64), 0) == 0.0
    # a sum past fp32's range still has a finite fp32 mean when the numel brings it back
    sums = exponent_sums(torch.full((4,), 3e38))
    assert mean_of_sums(sums, 4) == float(np.float32(3e38))
