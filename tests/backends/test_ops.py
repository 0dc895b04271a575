"""The torch.library custom ops of epi_kernels.ops: registration checked by torch.library.opcheck
(schema and mutation annotations against what the kernels really write, fake implementations,
tracing), and the fused host flow traced whole by torch.compile (fullgraph) giving the eager result."""
import pytest
import torch

from epi_kernels import ops, step_driver
from epi_kernels.launch import StepFlags, origins
from epi_kernels.mask import packed_numel
from epi_kernels.state import init_epi_state
from epi_kernels.step_driver import RefreshPlan
from epi_kernels.step_records import StepHyper, StepTensors
from epi_kernels.step_scalars import step_scalars
from epi_kernels.threshold import WINDOW_BINS, isolation_k, score_keys
from support.devices import CPU_KERNEL_BACKENDS

SIZES = (300, 17, 1)  # sizes the interpreter and the host harness step quickly; one odd mask byte


def _lists(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in SIZES]
    grads = [torch.randn(n, generator=g) for n in SIZES]
    exp_avgs = [torch.randn(n, generator=g) * 0.1 for n in SIZES]
    exp_avg_sqs = [torch.rand(n, generator=g) * 0.1 for n in SIZES]
    steps = [torch.tensor(3.0) for _ in SIZES]
    scores = [torch.rand(n, generator=g) for n in SIZES]
    masks = [torch.randint(0, 256, (packed_numel(n),), dtype=torch.uint8, generator=g) for n in SIZES]
    return params, grads, exp_avgs, exp_avg_sqs, [], steps, scores, masks


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, importance_beta=0.99)


def _opcheck(op, args, kwargs=None):
    # test_schema runs the op under a mode that reports writes to arguments not declared mutated
    torch.library.opcheck(op, args, kwargs or {},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def _median_keys(scores):
    return torch.stack([score_keys(s).median() for s in scores]).to(torch.int32)


@pytest.mark.parametrize("kernels", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["plain", "refresh", "collect", "both"])
def test_opcheck_fused_step(kernels, mode):
    params, grads, exp_avgs, exp_avg_sqs, vmax, steps, scores, masks = _lists()
    t = len(SIZES)
    tau = cut = origin = hist = over = counts = None
    median = _median_keys(scores)
    refresh, collect = mode in ("refresh", "both"), mode in ("collect", "both")
    if refresh:
        tau, counts = median, torch.zeros(t, 2, dtype=torch.int64)
        cut = torch.tensor([n // 3 for n in SIZES], dtype=torch.int64)  # tie cuts inside the tensors
    if collect:
        origin = origins(median)  # a window the new scores fall in: the histograms get counts
        hist, over = torch.zeros(t, WINDOW_BINS, dtype=torch.int64), torch.zeros(t, dtype=torch.int64)
    scalars = step_scalars(steps, torch.device("cpu"), **HYPER)
    control = torch.tensor([int(refresh), int(collect), 0], dtype=torch.int32)
    _opcheck(torch.ops.epi_kernels.fused_step_.default,
             (params, grads, exp_avgs, exp_avg_sqs, vmax, scores, masks, scalars, control, tau, cut, origin, hist,
              over, counts, kernels),
             dict(flags=StepFlags(sq=True, refresh=refresh, collect=collect).bits()))


@pytest.mark.parametrize("kernels", CPU_KERNEL_BACKENDS)
def test_opcheck_threshold_ops(kernels):
    scores = _lists()[6]
    origin = origins(_median_keys(scores))
    _opcheck(torch.ops.epi_kernels.window_histogram.default, (scores, origin, kernels))
    hist, over = ops.window_histogram(scores, origin, kernels)
    assert int(hist.sum() + over.sum()) <= sum(SIZES) and int(hist.sum()) > 0
    k = torch.tensor([isolation_k(0.1, s.numel()) for s in scores])
    _opcheck(torch.ops.epi_kernels.select_thresholds.default,
             (scores, hist, over, origin, k, torch.tensor(1, dtype=torch.int32), kernels))


@pytest.mark.parametrize("kernels", CPU_KERNEL_BACKENDS)
def test_opcheck_global_selection_ops(kernels):
    # scope="global": the selection op, and the fused step applying raw thresholds
    params, grads, exp_avgs, exp_avg_sqs, vmax, steps, scores, masks = _lists()
    args = (scores, torch.tensor([0x3F000000], dtype=torch.int32), torch.tensor([isolation_k(0.1, sum(SIZES))]),
            torch.tensor(1, dtype=torch.int32), kernels)
    _opcheck(torch.ops.epi_kernels.select_global.default, args)
    tau, repaired, lo, hi, cut = ops.select_global(*args)
    assert int(lo.min()) > 0 and bool((hi >= lo).all())
    counts = torch.zeros(len(SIZES), 2, dtype=torch.int64)
    _opcheck(torch.ops.epi_kernels.fused_step_.default,
             (params, grads, exp_avgs, exp_avg_sqs, vmax, scores, masks, step_scalars(steps, torch.device("cpu"), **HYPER),
              torch.tensor([1, 0, 0], dtype=torch.int32), lo, cut, None, None, None, counts, kernels),
             dict(flags=StepFlags(sq=True, refresh=True).bits(), above=hi))


def test_unknown_kernel_set_is_named():
    scores = _lists()[6]
    with pytest.raises(ValueError, match="unknown kernel set 'cutlass'"):
        ops.window_histogram(scores, torch.zeros(len(scores), dtype=torch.int32), "cutlass")


def _state(lists):
    states = []
    for p, s in zip(lists[0], lists[6]):
        st = {}
        init_epi_state(st, p, torch.float32)
        st["importance"] = s
        states.append(st)
    return states


@pytest.mark.parametrize("kernels,scope", [
    pytest.param(k.values[0], scope, marks=k.marks, id=f"{k.values[0]}-{scope}") for k in CPU_KERNEL_BACKENDS
    for scope in ("tensor", "global")])
def test_kernel_step_traces_whole_and_matches_eager(kernels, scope):
    # a step that collects histograms, then the refresh step that uses them (scope="global": that
    # computes its own): traced with fullgraph=True (any graph break fails), results bit-identical
    # to the eager flow
    def run(compiled: bool):
        lists = _lists(1)
        lists = lists[:6] + ([s for s in lists[6]], [torch.zeros_like(m) for m in lists[7]])
        states = _state(lists)
        pending: dict = {}

        def step(refresh: bool, collect: bool):
            step_driver.kernel_step(
                kernels, StepTensors(*lists), StepHyper(importance_beta=0.99, importance="sq", amsgrad=False, beta1=0.9,
                                                        beta2=0.999, lr=1e-2, weight_decay=0.01, eps=1e-8,
                                                        maximize=False, foreach=None, capturable=False, fused=None),
                RefreshPlan(states, 0.1, refresh, collect, pending, scope=scope))

        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        fn(False, True)
        fn(True, False)
        return lists, states

    (la, sa), (lb, sb) = run(False), run(True)
    for xs, ys in zip(la, lb):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)
    for a, b in zip(sa, sb):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) or (a[key].isnan().all() and b[key].isnan().all()), key
    assert all(int(st["isolated_count"]) > 0 for st in sa[:2])  # the refresh did isolate something


def test_fake_tensors_reach_the_fake_implementations():
    # eager calls on plain tensors skip the dispatcher; tensor subclasses must not (a fake tensor
    # has no memory for the kernels to read)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = [torch.empty(n) for n in SIZES]
        hist, over = ops.window_histogram(scores, torch.zeros(len(SIZES), dtype=torch.int32), "cuda")
        tau, repaired, cut = ops.select_thresholds(scores, hist, over, torch.zeros(len(SIZES), dtype=torch.int32),
                                                   torch.zeros(len(SIZES), dtype=torch.int64),
                                                   torch.ones((), dtype=torch.int32), "triton")
    assert hist.shape == (len(SIZES), WINDOW_BINS) and over.shape == tau.shape == cut.shape == (len(SIZES),)
    assert repaired.dtype == torch.bool
