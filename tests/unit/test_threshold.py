"""Threshold contract C1-C6 (README, "The threshold engine") against an exact oracle, plus hand-checked cases.

The oracle works on float values (torch.topk over the positive finite scores), not on the engine's
keys, so a broken key mapping fails these tests too.
"""
import math

import pytest
import torch

from bench.thresholds import radix_threshold
from epi_kernels import threshold as th
from support.score_inputs import DISTS, RATIOS, SLACK, adversarial, gen, kth_largest, n_selected, tau_value, tie_inputs


# ---------------------------------------------------------------- hand-checked pieces

def test_keys_are_sign_cleared_bits_and_ineligible_values_map_to_zero():
    s = torch.tensor([1.0, -2.0, 0.0, -0.0, float("inf"), float("nan"), 1e-45, -float("inf")])
    keys = th.score_keys(s)
    assert keys.dtype == torch.int32
    assert keys.tolist() == [0x3F800000, 0x40000000, 0, 0, 0, 0, 1, 0]


def test_keys_of_bf16_scores_are_their_fp32_bits_in_logical_order():
    s = torch.tensor([[0.5, 3.0], [2.0, 1.0]], dtype=torch.bfloat16).t()  # non-contiguous
    assert th.score_keys(s).tolist() == [0x3F000000, 0x40000000, 0x40400000, 0x3F800000]


@pytest.mark.parametrize("ratio,numel,k", [(0.29, 100, 29), (0.01, 99, 0), (0.1, 10, 1), (0.5, 7, 3),
                                           (0.0, 10**9, 0), (0.07, 100, 7), (0.999, 1000, 999)])
def test_isolation_k_is_floor_of_the_decimal_ratio(ratio, numel, k):
    assert th.isolation_k(ratio, numel) == k


def test_select_bin_by_hand():
    counts = torch.tensor([5, 0, 3, 2], dtype=torch.int64)  # bins in increasing key order
    # C = [5+0+3+2+1, 0+3+2+1, 3+2+1, 2+1] = [11, 6, 6, 3] with 1 key above the last bin
    assert th.select_bin(counts, 1, 1) is None  # the largest key is the one above: outside
    assert th.select_bin(counts, 1, 2) == (3, 1, 2)
    assert th.select_bin(counts, 1, 3) == (3, 2, 2)
    assert th.select_bin(counts, 1, 4) == (2, 1, 3)
    assert th.select_bin(counts, 1, 6) == (2, 3, 3)
    assert th.select_bin(counts, 1, 7) == (0, 1, 5)
    assert th.select_bin(counts, 1, 11) == (0, 5, 5)
    assert th.select_bin(counts, 1, 12) is None  # fewer than k keys in and above the window


def test_window_threshold_interpolates_inside_the_bin_by_hand():
    origin = 100 << th.BIN_SHIFT
    counts = torch.zeros(th.WINDOW_BINS, dtype=torch.int64)
    counts[7] = 5
    counts[9] = 3
    # k = 4: 3 keys come from bin 9, 1 more from bin 7 (5 keys): tau = hi(7) - ceil(1 * W / 5)
    hi7 = origin + (8 << th.BIN_SHIFT)
    assert th.window_threshold(counts, 0, 4, origin) == hi7 - math.ceil(th.BIN_WIDTH / 5)
    # k = 8 takes all of bin 7: tau is its lower edge
    assert th.window_threshold(counts, 0, 8, origin) == origin + (7 << th.BIN_SHIFT)
    # k = 9: below the window -> miss
    assert th.window_threshold(counts, 0, 9, origin) is None
    # a bin holding more than tolerance(k) + 1 keys is too coarse to interpolate
    counts[9] = 3 + 100
    assert th.window_threshold(counts, 0, 4, origin) is None


def test_window_origin_is_one_octave_below_and_bin_aligned():
    one = 0x3F800000  # bits of 1.0
    assert th.window_origin(one) == 0x3F000000  # 0.5
    assert th.window_origin(one + 12345) == 0x3F000000 + (12345 >> th.BIN_SHIFT << th.BIN_SHIFT)
    assert th.window_origin(5) == th.BIN_WIDTH  # never below: key 0 must stay under the window
    assert th.WINDOW_BINS * th.BIN_WIDTH == th.WINDOW_OCTAVES << 23


def test_window_histogram_counts_eligible_keys_only():
    origin = 0x3F000000
    s = torch.tensor([0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 8.0, 100.0, float("nan")])
    counts, over = th.window_histogram([th.score_keys(s)], origin)
    assert over == 2  # 8.0 and 100.0 are at or beyond 0.5 * 2**4
    assert int(counts.sum()) == 4  # 0.5, 0.5, 0.75, 1.0 (0.25 is below, 0 and NaN ineligible)
    assert int(counts[0]) == 2 and int(counts[512]) == 1 and int(counts[1024]) == 1


# ---------------------------------------------------------------- C2 determinism and pooling

def test_threshold_is_independent_of_element_order_and_of_splitting():
    g = torch.Generator().manual_seed(0)
    s = gen("lognormal_1", 1 << 15, g)
    keys = th.score_keys(s)
    k = th.isolation_k(0.05, s.numel())
    anchor = th.score_keys(kth_largest(s, k).reshape(1)).item()
    ref = th.approx_threshold([keys], k, anchor)
    perm = keys[torch.randperm(keys.numel(), generator=g)]
    assert th.approx_threshold([perm], k, anchor) == ref
    assert th.approx_threshold([keys[:1000], keys[1000:20000], keys[20000:]], k, anchor) == ref
    assert radix_threshold([keys[:7], keys[7:]], k) == radix_threshold([keys], k)


# ---------------------------------------------------------------- C3 bracketing on any input

@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5, 0.9])
def test_c3_threshold_lies_in_the_bin_of_the_kth_largest(ratio):
    g = torch.Generator().manual_seed(1)
    for name, s in adversarial(g):
        keys = th.score_keys(s)
        k = th.isolation_k(ratio, s.numel())
        vk = int(th.score_keys(kth_largest(s, k).reshape(1)))
        for anchor in (vk, vk // 2 + 1, vk + (1 << 23), th.KEY_NONE):
            tau, repaired = th.approx_threshold([keys], k, anchor)
            if repaired:
                assert tau == vk, (name, anchor)
            else:
                origin = th.window_origin(anchor)
                assert (tau - origin) >> th.BIN_SHIFT == (vk - origin) >> th.BIN_SHIFT, (name, anchor)
                assert abs(n_selected(s, tau) - k) <= th.tolerance(k), (name, anchor)


# ---------------------------------------------------------------- C4 accuracy, C5 nesting

@pytest.mark.parametrize("dist", DISTS)
def test_c4_count_error_on_smooth_distributions(dist):
    g = torch.Generator().manual_seed(2)
    s = gen(dist, 1 << 16, g)
    keys = th.score_keys(s)
    window_answers = 0
    for ratio in RATIOS:
        k = th.isolation_k(ratio, s.numel())
        vk = kth_largest(s, k)
        for factor in (1 / 7, 0.9, 1.0, 1.9):
            anchor = int(th.score_keys((vk * factor).reshape(1)))
            tau, repaired = th.approx_threshold([keys], k, anchor)
            window_answers += not repaired
            n = n_selected(s, tau)
            assert abs(n - k) <= SLACK(k), (ratio, factor, n, k)
            # C5: tie-free data, so the selection and the exact top-k are nested threshold sets
            top = torch.topk(s, k).indices
            sel = (s >= tau_value(tau)).nonzero().squeeze(1)
            small, big = (sel, top) if n <= k else (top, sel)
            assert torch.isin(small, big).all()
    assert window_answers > 0 or dist in ("uniform", "lognormal_0.25", "halfnormal")


def test_c4_window_path_is_accurate_when_it_answers_on_a_large_tensor():
    g = torch.Generator().manual_seed(3)
    s = gen("ema", 1 << 20, g)
    keys = th.score_keys(s)
    answered = 0
    for ratio in RATIOS:
        k = th.isolation_k(ratio, s.numel())
        anchor = int(th.score_keys(kth_largest(s, k).reshape(1)))
        tau, repaired = th.approx_threshold([keys], k, anchor)
        answered += not repaired
        assert abs(n_selected(s, tau) - k) <= SLACK(k)
    assert answered == len(RATIOS)  # heavy-tailed EMA scores never need the repair path


# ---------------------------------------------------------------- C5/C6 ties and edge cases

@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2, 0.5])
def test_c6_ties(ratio):
    g = torch.Generator().manual_seed(4)
    for name, s in tie_inputs(g):
        keys = th.score_keys(s)
        k = th.isolation_k(ratio, s.numel())
        vk = kth_largest(s, k)
        for anchor in (int(th.score_keys(vk.reshape(1).float())), th.KEY_NONE):
            tau, _ = th.approx_threshold([keys], k, anchor)
            f = s.float()
            above = int((f > tau_value(tau)).sum())
            at_least = int((f >= tau_value(tau)).sum())
            ok = tau == int(th.score_keys(vk.reshape(1).float())) or (
                above <= k + SLACK(k) and at_least >= k - SLACK(k))
            assert ok, (name, ratio, above, at_least, k)


def test_all_zero_scores_isolate_nothing():
    keys = th.score_keys(torch.zeros(1000))
    assert th.approx_threshold([keys], 10, th.KEY_NONE) == (th.KEY_NONE, True)
    assert th.exact_threshold([keys], 10) == th.KEY_NONE


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_edge_cases(mode):
    def tau_of(s, k, anchor=th.KEY_NONE):
        keys = [th.score_keys(s)]
        return th.approx_threshold(keys, k, anchor)[0] if mode == "approx" else th.exact_threshold(keys, k)

    s = torch.rand(100, generator=torch.Generator().manual_seed(5)) + 0.1
    assert tau_of(s, 0) == th.KEY_NONE  # k = 0 isolates nothing
    assert n_selected(s, tau_of(s, 100)) == 100  # k = numel
    assert n_selected(torch.tensor([2.5]), tau_of(torch.tensor([2.5]), 1)) == 1  # numel = 1
    assert tau_of(torch.tensor(3.0), 1) == 0x40400000  # 0-dim
    assert tau_of(torch.zeros(0), 0) == th.KEY_NONE  # empty
    den = torch.tensor([1e-45, 2e-45, 3e-45, 1e-40])  # denormals: exact order still holds
    assert tau_of(den, 2) == int(th.score_keys(torch.tensor([3e-45])))
    if mode == "approx":  # below the lowest window: the repair path answers, exactly
        assert th.approx_threshold([th.score_keys(den)], 3, 2) == (int(th.score_keys(torch.tensor([2e-45]))), True)
    mixed = torch.tensor([-0.0, 0.0, float("inf"), float("nan"), 1.0, 2.0])
    assert tau_of(mixed, 2) == 0x3F800000  # only 1.0 and 2.0 are eligible
    assert n_selected(mixed, tau_of(mixed, 5)) == 2  # fewer eligible than k: all of them
    # window misses: the scores jumped x16 up / x0.1 down since the anchor was set
    t = gen("halfnormal", 1 << 14, torch.Generator().manual_seed(6))
    k = th.isolation_k(0.05, t.numel())
    for scale in (16.0, 0.1):
        anchor = int(th.score_keys(kth_largest(t, k).reshape(1)))
        tau, repaired = th.approx_threshold([th.score_keys(t * scale)], k, anchor)
        assert repaired and tau == int(th.score_keys(kth_largest(t * scale, k).reshape(1)))


def test_radix_repair_equals_kthvalue_oracle():
    g = torch.Generator().manual_seed(7)
    for name, s in list(adversarial(g)) + list(tie_inputs(g)):
        keys = th.score_keys(s)
        for ratio in (0.003, 0.1, 0.7):
            k = th.isolation_k(ratio, s.numel())
            assert radix_threshold([keys], k) == th.exact_threshold([keys], k), (name, ratio)


def test_batched_thresholds_equal_single_ones_with_one_reduce_per_phase():
    g = torch.Generator().manual_seed(8)
    values = [th.score_keys(gen(d, 3000, g)) for d in ("halfnormal", "lognormal_1", "pareto_3", "uniform")]
    ks = [th.isolation_k(r, 3000) for r in (0.01, 0.05, 0.2, 0.0)]
    calls = []

    def reduce(counts):  # a stand-in for the all_reduce over a shard group: counts once per phase
        calls.append(counts.shape)
        return counts

    for anchors, phases in ((lambda vk: vk, 1), (lambda vk: th.KEY_NONE, 2)):
        anchor = [anchors(int(th.score_keys(kth_largest(v.view(torch.float32), max(k, 1)).reshape(1))))
                  for v, k in zip(values, ks)]
        calls.clear()
        batched = th.approx_thresholds([[v] for v in values], ks, anchor, reduce=reduce)
        assert batched == [th.approx_threshold([v], k, a) for v, k, a in zip(values, ks, anchor)]
        assert len(calls) == phases and calls[0][0] == 3  # the k = 0 tensor needs no counts


def test_a_refresh_of_many_shards_costs_two_collectives_when_the_windows_answer():
    from epi_kernels.refresh import Shard, refresh_masks
    from epi_kernels.state import init_epi_state

    calls = []

    def reduce(counts):  # one shard per group here: the all_reduce is the identity, counted
        calls.append(tuple(counts.shape))
        return counts

    g = torch.Generator().manual_seed(9)
    n = th.RADIX_BATCH + 8  # more tensors than one repair batch
    states = []
    for _ in range(n):
        st = {}
        init_epi_state(st, torch.empty(500), torch.float32)
        st["importance"].copy_(gen("halfnormal", 500, g))
        states.append(st)
    shards = [Shard(500, reduce)] * n

    def refresh():
        calls.clear()
        refresh_masks(states, isolation_ratio=0.05, scope="tensor", threshold="approx", shards=shards)
        return list(calls)

    first = refresh()  # no previous threshold: every tensor takes the repair path, in batches
    batches = math.ceil(n / th.RADIX_BATCH)
    # two radix levels per batch, the shards' tie counts (exact thresholds only), then the mask counts
    assert len(first) == 2 * batches + 2 and first[-2:] == [(1, n, 2), (n, 2)]
    for st in states:
        st["importance"].mul_(1.01)  # the next refresh's scores: its window answers
    assert refresh() == [(n, th.WINDOW_BINS + 2 + th.UNDER_SLOTS), (n, 2)]  # one for the histograms, one for the counts
    assert all(not bool(st["threshold_exact"]) for st in states)
