"""The eager refresh works slice by slice (threshold.SLICE) so that its temporaries are bounded by a
slice whatever the tensor's size (bench/memory.py measures the peaks): slicing must not change a
result. Every figure here is computed twice, with slices of 128 elements (so the data straddles
many slice boundaries, ties included) and with the whole tensor as one slice, and must agree to
the bit; thresholds also against the exact oracle. Not a timing test."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from epi_kernels import threshold as th
from epi_kernels.mask import isolated_indices, pack_mask, packed_numel, popcount
from epi_kernels.refresh import EAGER_OPS, refresh_masks
from epi_kernels.state import init_epi_state

SMALL = 128


def mixed(n: int, seed: int) -> torch.Tensor:
    """Scores of mixed magnitudes (1e-30 to 1e30, denormals), zeros, non-finite values, and one
    value repeated over a run that crosses slice boundaries (ties at any threshold near it)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g).exp_() ** 4 * 10.0 ** torch.randint(-30, 30, (n,), generator=g).float()
    s[torch.rand(n, generator=g) < 0.05] = 0.0
    s[torch.rand(n, generator=g) < 0.01] = 1e-42
    s[torch.randint(0, n, (3,), generator=g)] = float("nan")
    s[torch.randint(0, n, (3,), generator=g)] = float("inf")
    run = torch.arange(n // 3, n // 3 + min(3 * SMALL, n // 2))
    s[run] = s.nan_to_num(0.0, 0.0, 0.0).quantile(0.99)
    return s


def twice(monkeypatch, fn):
    """fn() with 128-element slices, then with one slice for everything."""
    monkeypatch.setattr(th, "SLICE", SMALL)
    small = fn()
    monkeypatch.setattr(th, "SLICE", 1 << 40)
    return small, fn()


SIZES = [1, 100, 3 * SMALL - 1, 3 * SMALL, 3 * SMALL + 1, 1500]


@pytest.mark.parametrize("origin", [th.BIN_WIDTH, 0x3F000000, 0x7F000000, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_slots_are_the_window_bins_of_the_keys(origin, dtype):
    s = mixed(5000, 1).to(dtype)
    if origin == "tensor":
        origin = torch.tensor(0x3E800000, dtype=torch.int32)
    assert torch.equal(th.eager_slots(s, origin), th.window_bins(th.score_keys(s), origin))


@pytest.mark.parametrize("n", SIZES)
def test_thresholds_counts_and_cuts_do_not_depend_on_slices(monkeypatch, n):
    scores = [mixed(n, seed) for seed in range(3)]
    keys = [th.score_keys(s) for s in scores]
    ks = [max(1, n // 20), n // 100, n]

    def engine():
        radix = th.radix_thresholds([[k] for k in keys], ks)
        out = {"radix": radix,
               "radix_of_scores": th.radix_thresholds([[s] for s in scores], ks, keys=th.score_keys),
               "repair": th.approx_thresholds([[k] for k in keys], ks, [th.KEY_NONE] * 3),
               "pooled": th.approx_threshold(keys, sum(ks), th.KEY_NONE)}
        # the window: anchored at the exact answer, a bit off it, and far off it (misses, repairs)
        for name, shift in (("window", 0), ("near", 1 << 20), ("far", 1 << 27)):
            anchors = [min(max(t - shift, 1), th.KEY_NONE - 1) if t < th.KEY_NONE else th.KEY_NONE for t in radix]
            out[name] = th.approx_thresholds([[s] for s in scores], ks, anchors, EAGER_OPS.bins, th.score_keys)
        for i, (k, tau) in enumerate(zip(ks, radix)):
            out[f"ties {i}"] = th.tie_counts(keys[i], tau).tolist()
            out[f"cut {i}"] = th.tie_cut(keys[i], tau, k)
            out[f"cut of scores {i}"] = th.tie_cut(scores[i], tau, k, th.score_keys)
        return out

    small, whole = twice(monkeypatch, engine)
    assert small == whole
    assert small["radix"] == [th.exact_threshold([k], kk) for k, kk in zip(keys, ks)]


def test_a_tie_run_across_slices_is_cut_at_the_same_element(monkeypatch):
    s = torch.cat([torch.full((1000,), 3.0), torch.full((1000,), 2.0), torch.ones(1000)])  # ties at 2.0
    keys = th.score_keys(s)
    tau = int(th.score_keys(torch.tensor([2.0])))
    for k in (1001, 1000 + SMALL, 1000 + 3 * SMALL + 5, 1990):
        small, whole = twice(monkeypatch, lambda: th.tie_cut(keys, tau, k))
        assert small == whole == k  # one past the (k - 1000)-th tied element, at flat index k - 1


def _states(params, importance_dtype=torch.float32):
    states = []
    for p in params:
        st = {}
        init_epi_state(st, p, importance_dtype)
        states.append(st)
    return states


def _refreshes(scores, scope, threshold, ratio):
    """Two refreshes (the first with no previous threshold, the second anchored at it) and every
    state entry after each."""
    states = _states(scores)
    for st, s in zip(states, scores):
        st["importance"].copy_(s)
    seen = []
    for _ in range(2):
        refresh_masks(states, isolation_ratio=ratio, scope=scope, threshold=threshold)
        seen.append([{k: v.clone() for k, v in st.items() if k != "importance"} for st in states])
        for st in states:
            st["importance"].mul_(1.01)
    return seen


def _equal(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("threshold", ["approx", "exact"])
@pytest.mark.parametrize("ratio", [0.01, 0.3])
def test_refreshed_states_do_not_depend_on_slices(monkeypatch, threshold, ratio):
    scores = [mixed(n, i) for i, n in enumerate([3 * SMALL + 1, 1500, 64, 1])]
    small, whole = twice(monkeypatch, lambda: _refreshes(scores, "tensor", threshold, ratio))
    assert _equal(small, whole)


@pytest.mark.parametrize("threshold", ["approx", "exact"])
def test_global_scope_does_not_depend_on_slices(monkeypatch, threshold):
    # mixed magnitudes: the means are exact integer sums (normalise.py), so slices cannot move one;
    # and integer scores: ties of the normalised scores across slices and tensors
    g = torch.Generator().manual_seed(3)
    scores = [mixed(3 * SMALL + 7, 8), torch.randint(0, 40, (2000,), generator=g).float(), mixed(900, 9)]
    small, whole = twice(monkeypatch, lambda: _refreshes(scores, "global", threshold, 0.1))
    assert _equal(small, whole)


def test_normalised_slices_are_the_whole_tensor_divided(monkeypatch):
    from epi_kernels.refresh import _normalised

    monkeypatch.setattr(th, "SLICE", SMALL)
    s = mixed(3 * SMALL + 5, 4)
    scaled = _normalised([s], [s.numel()], EAGER_OPS, th.identity)[0]
    sliced = torch.cat([part.clone() for _, part in th.slices(scaled)])  # (a slice lasts until the next)
    assert torch.equal(sliced.view(torch.int32), (s / scaled.divisor).view(torch.int32))  # bits, NaNs too
    finite = s.nan_to_num(0.0, 0.0, 0.0).double()
    assert scaled.divisor.item() == pytest.approx((finite.sum() / s.numel()).item(), rel=1e-6)


class _Allocations(TorchDispatchMode):
    """The largest tensor an op allocated (outputs that are not views of one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("scope,threshold", [("tensor", "approx"), ("tensor", "exact"), ("global", "approx")])
def test_no_refresh_temporary_scales_with_the_tensor(monkeypatch, scope, threshold):
    """1.5M elements in slices of 32768: every tensor a refresh allocates is bounded by a slice
    (8 B per element of one: a float64 partial sum), by the radix select's 2**16 counters
    (512 KiB), or is the new packed mask (1/8 B per element) — not by the tensor (1.5 MB for a
    bool per element, 6 MB for its keys)."""
    monkeypatch.setattr(th, "SLICE", 32768)
    n = 1_500_000
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(n, generator=g).square_(), torch.randn(1000, generator=g).square_()]
    states = _states(scores)
    for st, s in zip(states, scores):
        st["importance"].copy_(s)
    refresh_masks(states, isolation_ratio=0.01, scope=scope, threshold=threshold)  # (first-call work)
    for st in states:
        st["importance"].mul_(1.01)
    with _Allocations() as seen:
        refresh_masks(states, isolation_ratio=0.01, scope=scope, threshold=threshold)  # window (or radix) path
        for st in states:
            st["threshold_bits"].fill_(th.KEY_NONE)
        refresh_masks(states, isolation_ratio=0.01, scope=scope, threshold=threshold)  # radix path
    assert seen.largest <= max(8 * 32768, 8 << 16, packed_numel(n))


@pytest.mark.parametrize("n", SIZES + [64 * SMALL + 3])
def test_isolated_indices_and_counts_do_not_depend_on_slices(monkeypatch, n):
    g = torch.Generator().manual_seed(n)
    masks = [torch.rand(n, generator=g) < p for p in (0.0, 0.01, 0.5, 1.0)]
    for mask, other in zip(masks, masks[1:] + masks[:1]):
        packed, packed_other = pack_mask(mask), pack_mask(other)
        small, whole = twice(monkeypatch, lambda: (isolated_indices(packed, n), popcount(packed),
                                                   popcount(packed, packed_other)))
        assert all(torch.equal(a, b) for a, b in zip(small, whole))
        assert torch.equal(small[0], torch.arange(n)[mask])  # the oracle: the bool mask's own positions
        assert small[1].item() == int(mask.sum()) and small[2].item() == int((mask & other).sum())


def test_isolated_indices_temporaries_are_bounded_by_a_slice(monkeypatch):
    """The torch backend rebuilds the index after each refresh: nothing it allocates but the index
    itself (8 B per isolated element) may scale with the tensor (a bool per element would)."""
    monkeypatch.setattr(th, "SLICE", 32768)
    n = 1_500_000
    mask = torch.rand(n, generator=torch.Generator().manual_seed(6)) < 0.01
    packed = pack_mask(mask)
    with _Allocations() as seen:
        index = isolated_indices(packed, n)
    assert torch.equal(index, torch.arange(n)[mask])
    assert seen.largest <= max(8 * 32768, 8 * index.numel()) < n
