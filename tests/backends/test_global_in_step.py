"""scope="global" inside the kernel sets (Triton and CUDA): the means, the group's window histogram, select,
repair and tie cuts over the mean-normalised keys, and the raw thresholds the fused step applies
(ops.select_global), against the reference engine's refresh (refresh.refresh_masks) of the same
scores, bit for bit: the threshold, its repair flag, and every mask bit.

Scores are drawn per tensor at scales from 1e-44 (all denormal) to 1e20, with exact ties, zeros, denormals and
non-finite values, in fp32, bf16 and fp16 storage; the window origin comes from no previous
threshold (the repair path), from the reference's own threshold (the window answers) or from a
random key. A param group of several dtypes (several launch groups) selects through the reference
engine instead. Without a GPU the kernels run in Triton's interpreter and the CUDA extension's host
harness."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW, backends, ops
from epi_kernels.launch import StepFlags
from epi_kernels.mask import packed_numel, threshold_mask, unpack_mask
from epi_kernels.refresh import refresh_masks
from epi_kernels.state import init_epi_state
from epi_kernels.step_driver import RefreshPlan, kernel_step
from epi_kernels.step_records import StepHyper, StepTensors
from epi_kernels.step_scalars import step_scalars
from epi_kernels.threshold import KEY_NONE, isolation_k, score_keys
from support.devices import KERNEL_BACKENDS

pytestmark = pytest.mark.parametrize("kernels,device", [pytest.param(*p.values[0], marks=p.marks, id=p.id)
                                                         for p in KERNEL_BACKENDS])


@st.composite
def group_scores(draw):
    """(scores of 1-4 tensors, isolation ratio, how the anchor is chosen)."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.sampled_from([0, 1, 7, 64, 300, 1100]))
        scale = 10.0 ** draw(st.integers(-44, 20) if dtype == torch.float32 else st.integers(-4, 3))
        s = (torch.randn(n, generator=g, dtype=torch.float64) * 2).exp() * scale
        kind = draw(st.sampled_from(["spread", "ties", "sparse", "odd"]))
        if kind == "ties":  # few distinct values: exact ties at any threshold
            s = torch.randint(1, 4, (n,), generator=g).double() * scale
        elif kind == "sparse":
            s = torch.where(torch.rand(n, generator=g) < 0.6, 0.0, s)
        elif kind == "odd" and n:
            s[torch.randint(0, n, (max(n // 20, 1),), generator=g)] = draw(
                st.sampled_from([float("inf"), float("nan"), 1e-45, 0.0]))
        scores.append(s.to(dtype))
    return scores, draw(st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0])), draw(st.sampled_from(["none", "own", "random"]))


def _reference(scores, ratio, anchor):
    states = []
    for s in scores:
        state = {}
        init_epi_state(state, s, s.dtype)
        state["threshold_bits"].fill_(anchor)
        states.append(state)
    refresh_masks(states, isolation_ratio=ratio, scope="global", threshold="approx", scores=scores)
    return states


def _fused_step_masks(scores, lo, hi, cut, kernels):
    """The masks a refreshing fused step sets from the raw thresholds (fp32 params at zero)."""
    device = scores[0].device
    params = [torch.zeros(s.shape, device=device) for s in scores]
    masks = [torch.zeros(packed_numel(s.numel()), dtype=torch.uint8, device=device) for s in scores]
    scalars = step_scalars([torch.tensor(1.0) for _ in scores], device, lr=1e-3, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, importance_beta=0.9)
    ops.fused_step_(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                    [torch.zeros_like(p) for p in params], [], [s.clone() for s in scores], masks, scalars,
                    torch.tensor([1, 0, 0], dtype=torch.int32, device=device), lo, cut, None, None, None,
                    torch.zeros(len(scores), 2, dtype=torch.int64, device=device), kernels,
                    flags=StepFlags(sq=True, refresh=True).bits(), above=hi)
    return [m.cpu() for m in masks]


def _check(scores, ratio, anchor, kernels, device):
    """The kernels' selection over `scores` equals the reference's, from window origin `anchor`."""
    ref = _reference(scores, ratio, anchor)
    on = [s.to(device) for s in scores]
    k = torch.tensor([isolation_k(ratio, sum(s.numel() for s in scores))], device=device)
    tau, repaired, lo, hi, cut = ops.select_global(on, torch.tensor([anchor], dtype=torch.int32, device=device), k,
                                                   torch.ones((), dtype=torch.int32, device=device), kernels)
    assert int(tau) == int(ref[0]["threshold_bits"])
    assert bool(repaired) == bool(ref[0]["threshold_exact"])
    for i, (s, st_ref) in enumerate(zip(scores, ref)):
        keys = score_keys(s.float())  # the fused step's rule: raw keys >= lo before the cut, >= hi from it
        low = unpack_mask(threshold_mask(keys, int(lo[i]), keys.numel()), keys.numel())
        high = unpack_mask(threshold_mask(keys, int(hi[i]), keys.numel()), keys.numel())
        before = torch.arange(keys.numel()) < min(int(cut[i]), keys.numel())
        assert torch.equal(torch.where(before, low, high), unpack_mask(st_ref["isolation_mask"], keys.numel())), i
    if scores and scores[0].dtype != torch.float16:  # the fused step's own score storage: fp32, bf16
        for i, (mask, st_ref) in enumerate(zip(_fused_step_masks(on, lo, hi, cut, kernels), ref)):
            assert torch.equal(mask, st_ref["isolation_mask"]), i
    return ref


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=group_scores(), random_key=st.integers(1, KEY_NONE - 1))
def test_kernel_global_selection_is_the_reference(kernels, device, case, random_key):
    scores, ratio, anchor_kind = case
    anchor = {"none": KEY_NONE, "random": random_key}.get(anchor_kind)
    if anchor is None:  # the window around the threshold the reference reaches from scratch
        anchor = int(_reference(scores, ratio, KEY_NONE)[0]["threshold_bits"])
    _check(scores, ratio, anchor, kernels, device)


@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_denormal_huge_and_tied_tensors_side_by_side(kernels, device, ratio):
    # a tensor of denormals alone (its mean comes from exponent field 0), one near the fp32 maximum,
    # one of three tied values, one mostly zero: each is normalised by its own mean
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(700, generator=g) * 1e-40, torch.rand(300, generator=g) * 3e38,
              torch.randint(1, 4, (999,), generator=g).float(), torch.where(torch.rand(64, generator=g) < 0.9, 0.0, 1.0)]
    ref = _check(scores, ratio, KEY_NONE, kernels, device)
    assert sum(int(st["isolated_count"]) > 0 for st in ref) >= 2  # one selection across tensors
    _check(scores, ratio, int(ref[0]["threshold_bits"]), kernels, device)  # and from the window


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_ties_that_end_at_a_tensor_boundary(kernels, device, ratio):
    # constant tensors all normalise to 1.0: one tie over the group, and the top k ends exactly after
    # the first (ratio 0.5) or second (0.8) tensor, so the next ones isolate none of their tied keys
    scores = [torch.full((100,), 2.0), torch.full((60,), 5.0), torch.full((40,), 0.5)]
    ref = _check(scores, ratio, KEY_NONE, kernels, device)
    assert [int(st["isolated_count"]) for st in ref] == ([100, 0, 0] if ratio == 0.5 else [100, 60, 0])


def test_a_tie_cut_applies_the_raw_threshold_above_tau(kernels, device):
    # two tensors of 100 x 3.5 and 50 zeros: mean 2.333..., every 3.5 normalises to one key tau, as
    # does the raw key just below 3.5 (the division by the mean merges them), so lo < key(3.5) < hi.
    # k = 60 cuts the tie inside the first tensor: after the cut its keys must reach hi, not lo + 1
    scores = [torch.cat([torch.full((100,), 3.5), torch.zeros(50)]) for _ in range(2)]
    ref = _check(scores, 0.2, KEY_NONE, kernels, device)
    assert [int(st["isolated_count"]) for st in ref] == [60, 0]


def test_a_tie_cut_in_a_later_chunk_of_a_long_tensor(kernels, device):
    # the same tie over 20000-element runs: k = 12000 cuts the first tensor in its second chunk of
    # 8192 (the tie pass scans chunk counts, then one chunk), the second tensor isolates none
    scores = [torch.cat([torch.full((20000,), 3.5), torch.zeros(10000)]) for _ in range(2)]
    ref = _check(scores, 0.2, KEY_NONE, kernels, device)
    assert [int(st["isolated_count"]) for st in ref] == [12000, 0]


def test_gate_off_selects_nothing(kernels, device):
    # a capturable step that does not refresh: no pass over the scores counts anything
    scores = [torch.rand(500, generator=torch.Generator().manual_seed(1)).to(device)]
    tau, repaired, lo, hi, cut = ops.select_global(scores, torch.tensor([KEY_NONE], dtype=torch.int32, device=device),
                                                   torch.tensor([50], device=device),
                                                   torch.zeros((), dtype=torch.int32, device=device), kernels)
    assert int(tau) == KEY_NONE and int(lo[0]) == KEY_NONE and int(hi[0]) == KEY_NONE


def test_a_group_of_two_dtypes_selects_through_the_reference_engine(kernels, device):
    # one selection needs one launch group: fp32 and bf16 params in one global group refresh through
    # the engine (as with the torch backend), and so select what it selects
    def run(backend):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, device=device)),
                  torch.nn.Parameter(torch.randn(40, 7, device=device).bfloat16())]
        opt = EPIAdamW(params, backend=backend, scope="global", isolation_ratio=0.2, refresh_interval=2,
                       warmup_steps=1, importance_dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-3, 3, p.shape, generator=g)).to(p)
            opt.step()
        return [opt.isolation_mask(p).cpu() for p in params], [int(opt.state[p]["threshold_bits"]) for p in params]

    assert not backends.get(kernels).refreshes({"scope": "global", "threshold": "approx", "params": [
        torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)]}, False)
    masks, taus = run(kernels)
    ref_masks, ref_taus = run("torch")
    assert taus == ref_taus and all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
    assert sum(int(m.sum()) for m in masks) > 0


def test_a_global_kernel_step_over_two_launch_groups_is_refused_before_any_write(kernels, device):
    params = [torch.randn(64, device=device), torch.randn(64, device=device).bfloat16()]
    states = []
    for p in params:
        st = {}
        init_epi_state(st, p, torch.float32)
        states.append(st)
    steps = [torch.tensor(1.0) for _ in params]
    tensors = StepTensors(params, [torch.ones_like(p) for p in params], [torch.zeros_like(p) for p in params],
                          [torch.zeros_like(p) for p in params], [], steps, [st["importance"] for st in states],
                          [st["isolation_mask"] for st in states])
    hyper = StepHyper(importance_beta=0.99, importance="sq", amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2,
                      weight_decay=0.0, eps=1e-8, maximize=False, foreach=None, capturable=False, fused=None)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="one launch group"):
        kernel_step(kernels, tensors, hyper, RefreshPlan(states, 0.2, True, False, {}, scope="global"))
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(float(s) == 1.0 for s in steps)
