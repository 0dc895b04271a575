"""C5's tie rule (README, "The threshold engine"): a refresh never selects more than
k + max(k // 200, 4) elements; when the keys tied at an exact threshold would exceed that, all keys
above it and the first tied ones in flat order, up to k, are isolated. On every backend, in both
threshold modes, for one tensor, a param group (scope="global") and shards of a tensor.

The oracle works on float values with a stable sort, not on the engine's keys or cuts."""
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW
from epi_kernels import threshold as th
from epi_kernels.mask import pack_mask, threshold_mask, unpack_mask
from epi_kernels.refresh import Shard, refresh_masks
from epi_kernels.state import init_epi_state
from bench.thresholds import window_thresholds
from support.devices import CPU_KERNEL_BACKENDS

BACKENDS = ["torch", "compiled"] + CPU_KERNEL_BACKENDS


def tol(k):
    return max(k // 200, 4)


def oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The bool mask C5 prescribes for the exact threshold: from the float values, flat order."""
    f = scores.detach().float().reshape(-1)
    eligible = (f > 0) & f.isfinite()
    k = min(k, int(eligible.sum()))
    if k == 0:
        return torch.zeros_like(eligible)
    vk = torch.topk(torch.where(eligible, f, 0.0), k).values[-1]
    above, tied = eligible & (f > vk), eligible & (f == vk)
    if int(above.sum()) + int(tied.sum()) <= k + tol(k):
        return above | tied
    return above | (tied & (torch.cumsum(tied, 0) <= k - int(above.sum())))


def engine_mask(scores: torch.Tensor, k: int, anchor: int = th.KEY_NONE) -> tuple[torch.Tensor, bool]:
    keys = th.score_keys(scores)
    tau, repaired = th.approx_threshold([keys], k, anchor)
    cut = th.tie_cut(keys, tau, k) if repaired else th.TIE_NONE
    return unpack_mask(threshold_mask(keys, tau, cut), keys.numel()), repaired


# ---------------------------------------------------------------- the reported cases, every backend

@pytest.mark.parametrize("threshold", ["approx", "exact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_gradients_isolate_exactly_k_in_flat_order(backend, threshold):
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = EPIAdamW([p], isolation_ratio=0.01, refresh_interval=1, warmup_steps=1, backend=backend,
                   threshold=threshold)
    for _ in range(3):
        p.grad = torch.ones(1000)
        opt.step()
        stats = opt.isolation_stats()[0]
        if stats["refresh_step"] >= 2:  # step 1 refreshed from zero scores: nothing eligible
            assert (stats["k"], stats["selected"]) == (10, 10)
            assert opt.isolation_mask(p).nonzero().flatten().tolist() == list(range(10))


@pytest.mark.parametrize("threshold", ["approx", "exact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_layer_with_tied_rows_and_bias(backend, threshold):
    # loss = lin(x).mean(0).sum(): every bias gradient is 1 and every row of the weight gradient is
    # the same (the batch mean of x), so the bias is one tie and each weight column another
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 256)
    opt = EPIAdamW(lin.named_parameters(), lr=1e-3, isolation_ratio=0.01, refresh_interval=2, warmup_steps=2,
                   backend=backend, threshold=threshold)
    for _ in range(4):
        opt.zero_grad()
        lin(torch.randn(8, 16)).mean(0).sum().backward()
        start = {n: opt.state[p]["importance"].clone() for n, p in lin.named_parameters() if opt.state.get(p)}
        opt.step()
    stats = {s["name"]: s for s in opt.isolation_stats()}
    assert (stats["bias"]["k"], stats["bias"]["selected"]) == (2, 2)
    assert (stats["weight"]["k"], stats["weight"]["selected"]) == (40, 40)
    for name, p in lin.named_parameters():  # the last step (4) refreshed, from its start-of-step scores
        assert torch.equal(opt.isolation_mask(p).reshape(-1), oracle(start[name], stats[name]["k"])), name


# ---------------------------------------------------------------- random tie patterns

def tie_scores(g: torch.Generator, n: int, levels: int, zeros: float = 0.1) -> torch.Tensor:
    """Scores drawn from a few random fp32 values of mixed magnitudes, with some zeros and non-finite ones."""
    pool = torch.rand(levels, generator=g) * 10.0 ** torch.randint(-6, 4, (levels,), generator=g)
    s = pool[torch.randint(0, levels, (n,), generator=g)]
    s[torch.rand(n, generator=g) < zeros] = 0.0
    s[torch.rand(n, generator=g) < 0.01] = float("nan")
    return s


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5000), levels=st.integers(1, 12), ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**31),
       bf16=st.booleans())
def test_engine_meets_the_tie_rule_on_random_ties(n, levels, ratio, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    s = tie_scores(g, n, levels)
    if bf16:
        s = s.bfloat16()
    k = th.isolation_k(ratio, n)
    keys = th.score_keys(s)
    exact = th.exact_threshold([keys], k)
    assert torch.equal(unpack_mask(threshold_mask(keys, exact, th.tie_cut(keys, exact, k)), n), oracle(s, k))
    eligible = int(((s.float() > 0) & s.float().isfinite()).sum())
    for anchor in (th.KEY_NONE, exact, max(exact - (1 << 22), 1) if exact < th.KEY_NONE else 1):
        mask, repaired = engine_mask(s, k, anchor)
        selected = int(mask.sum())
        assert selected <= k + tol(k)
        assert selected >= min(k, eligible) - tol(k)
        if repaired:
            assert torch.equal(mask, oracle(s, k))


def test_tie_cut_by_hand():
    keys = th.score_keys(torch.tensor([3.0, 1.0, 2.0, 2.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5]))
    tau = int(th.score_keys(torch.tensor([2.0])))
    # 1 above, 7 tied at 2.0; k = 3 -> 2 tied needed; 8 > 3 + 4: cut after the 2nd tied (index 3)
    assert th.tie_cut(keys, tau, 3) == 4
    assert th.tie_cut(keys, tau, 4) == th.TIE_NONE  # 8 <= 4 + 4: within the tolerance, no cut
    assert th.tie_cut(keys, th.KEY_NONE, 3) == th.TIE_NONE
    counts = torch.stack([th.tie_counts(keys[:5], tau), th.tie_counts(keys[5:], tau)])
    # the same selection in two pieces: the first piece's two tied keys are all it needs (TIE_NONE:
    # all of them), the second takes none (0)
    assert th.tie_cuts(counts, [(0, keys[:5]), (1, keys[5:])], tau, 3) == [th.TIE_NONE, 0]
    assert th.tie_cuts(counts, [(0, keys[:5]), (1, keys[5:])], tau, 2) == [3, 0]  # one: index 2
    assert th.tie_cuts(counts, [(1, keys[5:])], tau, 3) == [0]  # the piece alone: the same answer


# ---------------------------------------------------------------- kernels against the reference

@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_kernel_tie_cuts_equal_the_reference(backend):
    g = torch.Generator().manual_seed(3)
    cases = [(torch.full((1000,), 0.25), 10), (torch.ones(20000), 300),  # the cut in the 2nd and 3rd chunk
             (torch.cat([torch.full((9000,), 2.0), torch.full((9000,), 1.0)]), 9500),  # tied below a block
             (torch.full((100,), 3.0).bfloat16(), 50), (torch.ones(64), 60),  # within the tolerance: no cut
             (torch.rand(5000, generator=g) + 1, 100)]  # no ties at all
    cases += [(tie_scores(g, n, lv), k) for n, lv, k in ((3000, 3, 40), (17000, 5, 2000), (700, 1, 7),
                                                         (9000, 2, 4500), (12345, 4, 11))]
    by_dtype = {}
    for s, k in cases:
        by_dtype.setdefault(s.dtype, []).append((s, k))
    cut_seen = 0
    for items in by_dtype.values():
        scores, ks = [s for s, _ in items], [k for _, k in items]
        tau, repaired, cut = window_thresholds(backend, scores, ks, [th.KEY_NONE] * len(scores))
        for i, (s, k) in enumerate(items):
            keys = th.score_keys(s)
            want_tau, want_repaired = th.approx_threshold([keys], k, th.KEY_NONE)
            want_cut = th.tie_cut(keys, want_tau, k)
            assert (int(tau[i]), bool(repaired[i]), int(cut[i])) == (want_tau, want_repaired, want_cut), i
            cut_seen += want_cut != th.TIE_NONE
    assert cut_seen >= 6


# ---------------------------------------------------------------- a param group, shards

@pytest.mark.parametrize("backend", BACKENDS)
def test_global_scope_takes_ties_in_parameter_order(backend):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (300, 500, 200)]
    opt = EPIAdamW(params, isolation_ratio=0.5, refresh_interval=1, warmup_steps=1, scope="global", backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)  # every mean-normalised score is 1: one tie over the group
        opt.step()
    masks = torch.cat([opt.isolation_mask(p) for p in params])
    assert masks.nonzero().flatten().tolist() == list(range(500))  # k = 500: the first tensor, then 200 of the next


class _ThreadGroup:
    """An all_reduce over threads (one per simulated rank): sums each call's counts across them."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.parts = world, threading.Barrier(world), {}

    def reduce_for(self, rank: int):
        def reduce(counts):
            self.parts[rank] = counts.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.world))
            self.barrier.wait()  # every rank has read the parts before the next call overwrites them
            return total
        return reduce


def _states(scores):
    """Optimizer-like EPI states holding the given scores."""
    out = []
    for s in scores:
        state = {}
        init_epi_state(state, torch.empty(s.shape), torch.float32)
        state["importance"].copy_(s)
        out.append(state)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shards_of_a_tensor_reach_the_unsharded_mask(world):
    g = torch.Generator().manual_seed(5)
    tensors = [tie_scores(g, 3000, 2, zeros=0.0), torch.full((999,), 0.5), tie_scores(g, 2000, 40)]
    whole = _states(tensors)
    refresh_masks(whole, isolation_ratio=0.3, scope="tensor", threshold="approx")
    bounds = [int(999 * r / world) for r in range(1, world)]  # inside the shortest tensor
    cuts = 0
    for t, w, joined in zip(tensors, whole, _refresh_sharded(tensors, bounds, 0.3)):
        assert torch.equal(joined, unpack_mask(w["isolation_mask"], t.numel()))
        cuts += int(w["isolated_count"]) == th.isolation_k(0.3, t.numel()) and bool(w["threshold_exact"])
    assert cuts >= 2  # the tie rule was exercised


def test_pack_of_the_oracle_is_the_stored_mask():
    # the packed form of a tie-cut mask (a cut that is not a multiple of 8 or 64)
    keys = th.score_keys(torch.ones(200))
    assert torch.equal(threshold_mask(keys, 0x3F800000, 77), pack_mask(torch.arange(200) < 77))


def _refresh_sharded(tensors, bounds, ratio, scope="tensor", threshold="approx"):
    """refresh_masks of `tensors` split at `bounds` over simulated ranks (threads): the joined masks,
    and rank 0's states."""
    world = len(bounds) + 1
    group = _ThreadGroup(world)
    pieces = [[t[a:b] for a, b in zip([0, *bounds], [*bounds, t.numel()])] for t in tensors]
    states = [_states([piece[r] for piece in pieces]) for r in range(world)]
    errors = []

    def rank(r):
        reduce = group.reduce_for(r)  # one per rank, as sharding.reducer makes one per process group
        shards = [Shard(t.numel(), reduce, r, world) for t in tensors]
        try:
            refresh_masks(states[r], isolation_ratio=ratio, scope=scope, threshold=threshold, shards=shards)
        except BaseException as e:  # (a thread's exception would otherwise vanish)
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [torch.cat([unpack_mask(states[r][i]["isolation_mask"], pieces[i][r].numel()) for r in range(world)])
            for i in range(len(tensors))]


MODES = [("tensor", "approx"), ("tensor", "exact"), ("global", "approx"), ("global", "exact")]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 3000), levels=st.integers(1, 6), ratio=st.floats(0.01, 0.6),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3), seed=st.integers(0, 2**31),
       mode=st.sampled_from(MODES), magnitudes=st.booleans())
def test_any_shard_split_reaches_the_unsharded_masks(n, levels, ratio, cuts, seed, mode, magnitudes):
    """In every mode: one whole-tensor selection (scope="tensor") or one over the group ("global",
    whose means come from exponent sums added over the shards) equals the unsharded one, ties
    included (taken in tensor order, then shard order)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [tie_scores(g, n, levels), tie_scores(g, n // 2 + 1, 50)]  # ties, and few ties
    if magnitudes:  # tensors of very different scales, one of them with denormals and non-finite scores
        tensors = [tensors[0] * 1e-30, tensors[1] * 1e20]
        tensors[0][::7] = 1e-44
        tensors[1][:: max(1, n // 3)] = float("inf")
    bounds = sorted(int(c * min(t.numel() for t in tensors)) for c in cuts)  # uneven, empty shards too
    scope, threshold = mode
    whole = _states(tensors)
    refresh_masks(whole, isolation_ratio=ratio, scope=scope, threshold=threshold)
    total = sum(t.numel() for t in tensors)
    for t, w, joined in zip(tensors, whole, _refresh_sharded(tensors, bounds, ratio, scope, threshold)):
        assert torch.equal(joined, unpack_mask(w["isolation_mask"], t.numel()))
        k = th.isolation_k(ratio, t.numel() if scope == "tensor" else total)
        assert int(w["isolation_k"]) == k
    if scope == "tensor":
        assert all(int(w["isolated_count"]) <= int(w["isolation_k"]) + tol(int(w["isolation_k"])) for w in whole)
    else:
        k = th.isolation_k(ratio, total)
        assert sum(int(w["isolated_count"]) for w in whole) <= k + tol(k)


def test_global_scope_refuses_a_group_mixing_shards_and_whole_tensors():
    from epi_kernels.refresh import selection_shard

    shard = Shard(10, lambda c: c, 0, 2)
    assert selection_shard([None, None]) is None and selection_shard([shard, shard]) is shard
    for mixed in ([shard, None], [None, shard], [shard, Shard(10, lambda c: c, 1, 2)]):
        with pytest.raises(ValueError, match="scope='global' in param group 3 selects over tensors that are all"):
            selection_shard(mixed, " in param group 3")


@pytest.mark.parametrize("backend", [p for p in CPU_KERNEL_BACKENDS if p.values[0] == "cuda"])
@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 20000), levels=st.integers(1, 8), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31),
       bf16=st.booleans(), anchored=st.booleans())
def test_cuda_kernels_equal_the_reference_on_random_ties(backend, n, levels, ratio, seed, bf16, anchored):
    # the CUDA kernels' host harness is fast enough for property testing (Triton's interpreter is
    # not: it is held to the same reference on fixed cases above)
    g = torch.Generator().manual_seed(seed)
    s = tie_scores(g, n, levels)
    s = s.bfloat16() if bf16 else s
    keys, k = th.score_keys(s), th.isolation_k(ratio, n)
    anchor = th.exact_threshold([keys], max(k, 1)) if anchored else th.KEY_NONE
    tau, repaired, cut = window_thresholds("cuda", [s], [k], [anchor])
    want_tau, want_repaired = th.approx_threshold([keys], k, anchor)
    want_cut = th.tie_cut(keys, want_tau, k) if want_repaired else th.TIE_NONE
    assert (int(tau[0]), bool(repaired[0]), int(cut[0])) == (want_tau, want_repaired, want_cut)
