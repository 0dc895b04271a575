"""The compiled extension epi_kernels._C on any machine: its constants are the threshold engine's,
a missing GPU or driver is a clear RuntimeError (never a silent no-op), and its fp32 <-> bf16/fp16
conversions (csrc/element.h, run through the host harness) are torch's to the bit.

The kernels' arithmetic against the pure-PyTorch reference is tested in test_kernel_backends.py
(the "cuda-host-harness" cases without a GPU, "cuda" with one)."""
import sys

import pytest
import torch

from epi_kernels import abi
from epi_kernels import threshold as th
from support.devices import HAS_CUDA, HAS_EXTENSION, NO_EXTENSION
from support.large_histograms import large_histograms, reference_window_select

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason=NO_EXTENSION)


@pytest.fixture(scope="module")
def C():
    from epi_kernels import _C

    return _C


def test_constants_are_the_reference_engines(C):
    k = C.constants()
    for name in ("KEY_NONE", "TIE_NONE", "MANTISSA_BITS", "WINDOW_OCTAVES", "BIN_SHIFT", "BIN_WIDTH", "WINDOW_BINS"):
        assert k[name] == getattr(th, name), name
    assert k["TIE_NONE"] == 2**63 - 1
    assert (k["CHUNK"], k["TABLE_WIDTH"]) == (abi.CHUNK, len(abi.COLUMNS))
    abi.check_cuda_constants(k)  # the check the package runs when it loads the extension
    # the repair digits tile the 31-bit key from the top, and fit the scratch row
    levels = k["RADIX_LEVELS"]
    assert levels[0][0] + levels[0][1] == 31 and levels[-1][0] == 0
    assert all(a[0] == b[0] + b[1] for a, b in zip(levels, levels[1:]))
    assert max(bits for _, bits in levels) <= k["RADIX_BINS"].bit_length() - 1


@pytest.mark.parametrize("name", ["CHUNK", "CTRL_SKIP", "STEP_COLLECT", "RADIX_LEVELS", "TOLERANCE_DIVISOR"])
def test_a_build_for_another_abi_is_refused(C, name):
    k = dict(C.constants())
    k[name] = [(0, 31)] if name == "RADIX_LEVELS" else k[name] + 1
    with pytest.raises(ImportError, match=f"another kernel ABI.*{name}="):
        abi.check_cuda_constants(k)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_no_gpu_is_a_clear_runtime_error(C):
    with pytest.raises(RuntimeError, match=r"epi_kernels\._C\.device_count: cuda\w+: "):
        C.device_count()
    # a launch, too: the kernel never runs, and the wrapper says so instead of returning
    with pytest.raises(RuntimeError, match=r"epi_kernels\._C\.window_select: cuda\w+: "):
        C.window_select(1, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_count_on_a_gpu(C):
    assert C.device_count() == torch.cuda.device_count() >= 1


def _special_floats():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31, (200_000,), generator=g, dtype=torch.int64)
    bits = torch.cat([bits, bits | (1 << 31)]).to(torch.int64)
    random = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)  # every exponent
    halfway = torch.arange(-4096, 4096, dtype=torch.float32) * 2**-10 + 2**-11  # ties of fp16/bf16 steps
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                          2**-14, 2**-24, 2**-25, 1.5 * 2**-25, 2**-26, 6.1e-5, 3.4e38, 1e-40, -1e-45])
    return torch.cat([random, halfway, edges, halfway * 2**-14, halfway * 2**-20])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_storage_rounding_and_widening_match_torch(C, dtype):
    code = C.constants()["DTYPE_BF16" if dtype == torch.bfloat16 else "DTYPE_F16"]
    x = _special_floats()
    got = torch.empty(x.shape, dtype=torch.int16)
    C.host.round_to(code, x.data_ptr(), got.data_ptr(), x.numel())
    want = x.to(dtype).view(torch.int16)
    nan = x.isnan()
    assert torch.equal(got[~nan], want[~nan])
    assert got[nan].view(dtype).isnan().all()
    back = torch.empty(x.shape, dtype=torch.float32)
    C.host.widen(code, want.data_ptr(), back.data_ptr(), x.numel())
    assert torch.equal(back[~nan].view(torch.int32), want[~nan].view(dtype).float().view(torch.int32))
    assert back[nan].isnan().all()


def test_extension_that_does_not_load_is_reported_and_not_used(monkeypatch):
    from epi_kernels import backends

    monkeypatch.setitem(sys.modules, "epi_kernels.kernel_sets.cuda_kernels", None)  # import now fails
    backends.get("cuda").available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="epi_kernels._C is installed but does not load"):
            assert "cuda" not in backends.available_backends()
        assert backends.resolve_backend("auto", torch.device("cuda")) in ("triton", "torch")
    finally:
        backends.get("cuda").available.cache_clear()


@pytest.mark.parametrize("runtime,driver,usable", [(13000, 12080, False), (13000, 0, False), (13000, 13000, True),
                                                   (13010, 13000, True), (12080, 13020, True)])
def test_a_driver_older_than_the_built_in_runtime_is_reported_and_not_used(C, monkeypatch, runtime, driver, usable):
    """A release wheel built with CUDA 13 on a machine whose driver supports only CUDA 12: backend="auto"
    must pick another backend, with a warning naming both versions, instead of failing at the first
    launch. Only where torch sees a GPU (simulated here)."""
    from epi_kernels import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(C, "cuda_versions", lambda: (runtime, driver))
    backends.get("cuda").available.cache_clear()
    try:
        if usable:
            assert "cuda" in backends.available_backends()
        else:
            want = rf"built with CUDA {runtime // 1000}\.{runtime % 1000 // 10}, .* supports CUDA {driver // 1000}\."
            with pytest.warns(RuntimeWarning, match=want):
                assert "cuda" not in backends.available_backends()
            assert backends.resolve_backend("auto", torch.device("cuda")) != "cuda"
    finally:
        backends.get("cuda").available.cache_clear()


def test_the_built_in_runtime_and_the_driver_are_reported(C):
    runtime, driver = C.cuda_versions()
    assert runtime >= 12000 and runtime % 10 == 0, runtime  # 1000 * major + 10 * minor, from the static runtime
    assert driver == 0 or driver >= 10000, driver
    if torch.cuda.is_available():
        assert driver >= runtime // 1000 * 1000, (runtime, driver)  # else the GPU tests could not run


# --- int64 counts: window histograms, k and the repair path's need/scratch may exceed 2^31 ---------

def _host_window_select(C, hist, over, origin, k):
    """_C.host.window_select on CPU tensors: (tau, repair) lists."""
    tau, repair = torch.zeros(len(k), dtype=torch.int32), torch.full((len(k),), 7, dtype=torch.int32)
    C.host.window_select(len(k), hist.data_ptr(), over.data_ptr(), origin.data_ptr(), k.data_ptr(),
                         tau.data_ptr(), repair.data_ptr())
    return tau.tolist(), repair.tolist()


@pytest.mark.parametrize("seed", range(8))
def test_window_select_with_counts_beyond_int32(C, seed):
    hist, over, origin, k = large_histograms(seed)
    assert hist.sum(1).max() > 2**31 and k.max() > 2**31  # the point of the test
    got = _host_window_select(C, hist, over, origin, k)
    assert got == reference_window_select(hist, over, origin, k)


def test_window_select_hand_picked_large_counts(C):
    bins = th.WINDOW_BINS
    hist = torch.zeros(4, bins, dtype=torch.int64)
    hist[:, bins - 1] = 3_000_000_000  # top bin: 3e9 keys
    hist[:, bins - 2] = 2**31 + 5
    hist[:, 100] = 7
    hist[:, 99] = 2**20  # fine enough for k ~ 5e9 (tolerance k // 200)
    over = torch.tensor([2**31 + 1, 0, 2**32, 5], dtype=torch.int64)
    origin = torch.full((4,), 1 << 23, dtype=torch.int32)
    total = int(hist[0].sum())
    k = torch.tensor([2**31 + 1 + 3_000_000_000 + 2**31 + 5 + 7 + 1000,  # inside bin 99 (past over and the top bins)
                      3_000_000_000 + 2**31 + 5 + 7 + 2**20,  # bin 99's last key
                      2**32 - 1,  # within over: a miss
                      total + 6], dtype=torch.int64)  # more than there are: a miss
    want = reference_window_select(hist, over, origin, k)
    assert want[0][:2] != [th.KEY_NONE, th.KEY_NONE] and want[1] == [0, 0, 1, 1]
    assert _host_window_select(C, hist, over, origin, k) == want


def test_radix_repair_need_is_int64(C):
    """The repair path clips a k beyond 2^31 to the eligible keys (need and scratch int64)."""
    scores = torch.tensor([0.5, 0.0, 2.0, 1.0, float("nan"), 3.0] * 3, dtype=torch.float32)
    table = torch.tensor([[scores.data_ptr()] + [0] * 4 + [scores.data_ptr(), 0, scores.numel()]], dtype=torch.int64)
    chunks = torch.tensor([[0, 0]], dtype=torch.int32)
    repair, prefix, tau = (torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                           torch.zeros(1, dtype=torch.int32))
    k = torch.tensor([2**33 + 3], dtype=torch.int64)
    need, cut, ties = k.clone(), torch.full((1,), th.TIE_NONE, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    scratch = torch.zeros(1, C.constants()["RADIX_BINS"], dtype=torch.int64)

    def repair_():
        C.host.radix_repair(table.data_ptr(), chunks.data_ptr(), 1, 1, C.constants()["DTYPE_F32"], 0, k.data_ptr(),
                            repair.data_ptr(), prefix.data_ptr(), need.data_ptr(), scratch.data_ptr(), tau.data_ptr(),
                            cut.data_ptr(), ties.data_ptr())

    repair_()
    keys = th.score_keys(scores)
    assert int(tau) == th.exact_threshold([keys], 2**33 + 3) == int(keys[keys > 0].min())
    assert int(repair) == 0 and int(scratch.abs().sum()) == 0
    assert int(cut) == th.TIE_NONE  # k clipped to the eligible keys: all of them, no tie cut
    # a k within the eligible keys
    repair.fill_(1), prefix.zero_(), k.fill_(4), need.fill_(4)
    repair_()
    assert int(tau) == th.exact_threshold([keys], 4)
    assert int(cut) == th.TIE_NONE  # 3 above, 3 tied: 6 <= k + tolerance


# --- the tie cut (README "The threshold engine", threshold.tie_cuts): a repaired threshold shared by
# more keys than k + tolerance(k) allows isolates the keys above it and the first `need` tied keys in
# flat order, exactly k. Checked against an oracle written here with plain torch (sort, nonzero). ---

TIE_DEVICES = [pytest.param("cpu", id="host-harness"),
               pytest.param("cuda", id="cuda",
                            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])]
TIE_NONE = 2**63 - 1
# decay, step_size, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps, importance beta, 1 - it
STEP_SCALARS = (1.0, 0.01, 0.1, 0.999, 0.001, 1.0, 1e-8, 0.5, 0.5)


def _kernels(device):
    from epi_kernels.kernel_sets.cuda_kernels import kernels_for

    return kernels_for(torch.device(device))


def _step_inputs(tensors, device, refresh=True, collect=False):
    """(scalars [T, 9], control words) of a step that may refresh / collect."""
    scalars = torch.tensor([STEP_SCALARS] * tensors, dtype=torch.float32, device=device)
    return scalars, torch.tensor([int(refresh), int(collect), 0], dtype=torch.int32, device=device)


def _tie_oracle(scores, k):
    """(tau, cut, mask) of the tie rule for one score tensor: keys are the fp32 bit patterns of |s|,
    zero and non-finite scores ineligible; tau the k-th largest eligible key (k clipped); a cut when
    #{key > tau} + #{key == tau} > k + max(k // 200, 4)."""
    s = scores.detach().reshape(-1).cpu().float()
    keys = s.abs().view(torch.int32).to(torch.int64)
    keys[~torch.isfinite(s) | (s == 0)] = 0
    eligible = keys[keys > 0]
    kc = min(k, eligible.numel())
    if kc < 1:
        return th.KEY_NONE, TIE_NONE, torch.zeros(keys.numel(), dtype=torch.bool)
    tau = int(eligible.sort(descending=True).values[kc - 1])
    above, tied = int((keys > tau).sum()), int((keys == tau).sum())
    cut = TIE_NONE
    if above + tied > k + max(k // 200, 4):
        cut = int((keys == tau).nonzero()[k - above - 1, 0]) + 1
    index = torch.arange(keys.numel())
    return tau, cut, (keys > tau) | ((keys == tau) & (index < cut))


def _select(device, scores, ks, anchors=None, gate=None):
    """tau, window flags and tie cuts of score tensors (one launch) by the kernels: window histograms
    from `anchors` (None: no window, every tensor with k >= 1 goes to the repair path), select."""
    from epi_kernels.launch import Launch

    kernels = _kernels(device)
    scores = [s.to(device) for s in scores]
    launch = Launch([[s, None, None, None, None, s, None] for s in scores])
    n = len(scores)
    origin = torch.zeros(n, dtype=torch.int32, device=device)
    hist = torch.zeros(n, th.WINDOW_BINS, dtype=torch.int64, device=device)
    over = torch.zeros(n, dtype=torch.int64, device=device)
    if anchors is not None:
        origin = torch.tensor([th.window_origin(a) if a < th.KEY_NONE else 0 for a in anchors], dtype=torch.int32,
                              device=device)
        kernels.window_histogram(launch, origin, hist, over)
    k = torch.tensor(ks, dtype=torch.int64, device=device)
    tau, repair = torch.zeros(n, dtype=torch.int32, device=device), torch.zeros(n, dtype=torch.int32, device=device)
    cut = torch.full((n,), TIE_NONE, dtype=torch.int64, device=device)
    kernels.select(launch, hist, over, origin, k, tau, repair, cut,
                   None if gate is None else torch.tensor(gate, dtype=torch.int32, device=device))
    return tau.tolist(), repair.tolist(), cut.tolist()


def _unpack(mask, n):
    return ((mask.cpu().unsqueeze(1).to(torch.int32) >> torch.arange(8)) & 1).reshape(-1)[:n].bool()


def _refresh_step(device, scores, taus, cuts, seed=0):
    """A refreshing fused step (fp32 params) over tensors with these start-of-step scores, thresholds and
    tie cuts: (new mask bits, (isolated, kept) counts, old mask bits, params before, params after) per tensor."""
    from epi_kernels.launch import Launch, StepFlags

    g = torch.Generator().manual_seed(seed)
    rows, before, old = [], [], []
    for s in scores:
        n = s.numel()
        p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
        mask = torch.randint(0, 256, ((n + 7) // 8,), generator=g, dtype=torch.int32).to(torch.uint8)
        before.append(p.clone())
        old.append(_unpack(mask, n))
        rows.append([p.to(device), grad.to(device), torch.zeros(n, device=device), torch.zeros(n, device=device),
                     None, s.clone().to(device), mask.to(device)])
    launch = Launch(rows)
    counts = torch.zeros(len(rows), 2, dtype=torch.int64, device=device)
    _kernels(device).fused_step(launch, StepFlags(False, False, False, True, False), *_step_inputs(len(rows), device),
                                torch.tensor(taus, dtype=torch.int32, device=device),
                                torch.tensor(cuts, dtype=torch.int64, device=device), None, None, None, counts)
    launch.finish()
    return ([_unpack(r[6], r[0].numel()) for r in rows], counts.cpu(), old, before, [r[0].cpu() for r in rows])


def _tie_cases():
    """(name, scores, k): heavy ties at the k-th key, ties within the tolerance, none at all."""
    g = torch.Generator().manual_seed(14)

    def rand(n, lo=0.01, hi=0.1):
        return torch.rand(n, generator=g) * (hi - lo) + lo

    cases = [("all-equal", torch.full((1000,), 0.5), 10)]
    s = rand(3000)  # two tie levels: 30 keys above, the k-th among 500 tied ones
    perm = torch.randperm(3000, generator=g)
    s[perm[:30]], s[perm[30:530]] = 2.0, 1.0
    cases.append(("two-levels", s, 100))
    for tied, name in ((7, "cut-by-one"), (6, "within-tolerance"), (2, "tied-exactly-k")):
        s = rand(200)  # 8 keys above, `tied` at the k-th: above + tied vs k + tolerance = 14
        perm = torch.randperm(200, generator=g)
        s[perm[:8]], s[perm[8:8 + tied]] = 3.0, 2.0
        cases.append((name, s, 10))
    s = rand(20000)  # need-th tied key in the second chunk (CHUNK = 8192) and a later tile
    s[::3] = 1.0
    s[torch.randperm(20000, generator=g)[:50]] = 2.0 + rand(50)
    cases.append(("second-chunk", s, 50 + 3400))
    n = 300 * 8192 + 5  # more chunks than a block scans at once (256): need-th tied key in chunk ~280
    s = rand(n)
    s[::7] = 1.0
    s[torch.randperm(n, generator=g)[:100]] = 2.0 + rand(100)
    cases.append(("many-chunks", s, 100 + 280 * 8192 // 7))
    for k in (2048, 2049, 8192, 8193, 16384, 16385):  # cut at tile (2048) and chunk boundaries
        cases.append((f"all-equal-20000-k{k}", torch.full((20000,), 0.25), k))
    s = torch.full((1000,), 0.5)
    s[900:] = 0.0
    cases.append(("k-beyond-eligible", s, 950))  # k clipped to 900 eligible keys: all isolated, no cut
    cases.append(("k-zero", torch.full((100,), 0.5), 0))
    for seed in range(6):  # random tie patterns: a few values of mixed magnitude
        n = (777, 5000, 20000)[seed % 3]
        values = torch.randn(8, generator=g).abs() * 10.0 ** torch.randint(-3, 3, (8,), generator=g)
        s = values[torch.randint(0, 8, (n,), generator=g)]
        s[torch.randint(0, n, (n // 50,), generator=g)] = 0.0
        s[torch.randint(0, n, (3,), generator=g)] = float("nan")
        cases.append((f"random-{seed}", s, [1, n // 100, n // 10, n // 3, n - 5, n][seed]))
    bits = torch.randperm(20000, generator=g)[:5000] + 0x2000  # distinct bf16 (and fp32) values: no ties at all
    cases.append(("distinct", bits.to(torch.int16).view(torch.bfloat16).float(), 50))
    return cases


TIE_CASES = _tie_cases()


@pytest.mark.parametrize("device", TIE_DEVICES)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tie_cut_select_and_refresh_match_the_oracle(device, score_dtype):
    """Every case in one launch (per-tensor k, need and cut), then a refreshing fused step with them:
    tau, cut and the mask bits equal the oracle's; a cut tensor isolates exactly k."""
    scores = [s.to(score_dtype) for _, s, _ in TIE_CASES]
    ks = [k for _, _, k in TIE_CASES]
    taus, window, cuts = _select(device, scores, ks)
    assert window == [int(k >= 1) for k in ks]  # no window: every tensor with k >= 1 was repaired
    bits, counts, old, before, after = _refresh_step(device, scores, taus, cuts)
    cut_any = False
    for j, (name, _, k) in enumerate(TIE_CASES):
        tau, cut, mask = _tie_oracle(scores[j], k)
        assert (taus[j], cuts[j]) == (tau, cut), name
        keys = th.score_keys(scores[j])
        assert th.tie_cuts(th.tie_counts(keys, tau)[None], [(0, keys)], tau, k) == [cut], name  # the reference
        assert torch.equal(bits[j], mask), (name, int((bits[j] != mask).sum()))
        assert counts[j].tolist() == [int(mask.sum()), int((mask & old[j]).sum())], name
        assert torch.equal(after[j][mask], before[j][mask]), name  # isolated: bit-identical
        assert bool((after[j][~mask] != before[j][~mask]).all()), name
        if cut != TIE_NONE:
            cut_any = True
            assert int(mask.sum()) == k, name
    assert cut_any
    by_name = {name: (cuts[j], bits[j]) for j, (name, _, _) in enumerate(TIE_CASES)}
    assert by_name["all-equal"][0] == 10 and by_name["all-equal"][1].nonzero().flatten().tolist() == list(range(10))
    assert 8192 < by_name["second-chunk"][0] <= 16384
    assert 256 * 8192 < by_name["many-chunks"][0] <= 300 * 8192
    for k in (2048, 2049, 8192, 8193, 16384, 16385):
        assert by_name[f"all-equal-20000-k{k}"][0] == k
    assert by_name["cut-by-one"][0] != TIE_NONE
    for name in ("within-tolerance", "tied-exactly-k", "k-beyond-eligible", "k-zero", "distinct", "random-5"):
        assert by_name[name][0] == TIE_NONE, name
    assert int(by_name["within-tolerance"][1].sum()) == 14  # key >= tau: 4 more than k, within tolerance


@pytest.mark.parametrize("device", TIE_DEVICES)
@pytest.mark.parametrize("case", ["all-equal", "two-levels", "second-chunk", "random-1"])
def test_tie_cut_single_tensor_and_misaligned_scores(device, case):
    """One tensor per launch, and the same scores one element into a buffer (no 16-byte alignment:
    the tie pass's and the fused step's scalar loads)."""
    name, s, k = next(c for c in TIE_CASES if c[0] == case)
    tau, cut, mask = _tie_oracle(s, k)
    assert cut != TIE_NONE
    shifted = torch.cat([torch.ones(1), s])[1:]
    assert shifted.data_ptr() % 16 != 0
    for scores in (s, shifted):
        taus, _, cuts = _select(device, [scores], [k])
        assert (taus, cuts) == ([tau], [cut])
        bits, counts, _, _, _ = _refresh_step(device, [scores], taus, cuts, seed=1)
        assert torch.equal(bits[0], mask) and int(counts[0, 0]) == k


@pytest.mark.parametrize("device", TIE_DEVICES)
def test_window_answers_need_no_cut_and_a_gated_repair_writes_none(device):
    """A tensor the window answers keeps cut = TIE_NONE (its count error is bounded by the tolerance);
    a tied tensor with the same anchor falls to the repair path and is cut; with the repair path
    gated off (a capturable step that does not refresh) no cut is written."""
    g = torch.Generator().manual_seed(3)
    smooth = torch.rand(5000, generator=g) + 1.0
    tied = torch.full((5000,), 1.5)
    k = 50
    anchors = [_tie_oracle(smooth, k)[0], _tie_oracle(tied, k)[0]]
    taus, window, cuts = _select(device, [smooth, tied], [k, k], anchors)
    assert window == [0, 1] and cuts == [TIE_NONE, 50]
    assert taus[1] == anchors[1]
    bits, counts, _, _, _ = _refresh_step(device, [smooth, tied], taus, cuts)
    assert torch.equal(bits[0], th.score_keys(smooth) >= taus[0])  # the window's rule: key >= tau
    assert abs(int(bits[0].sum()) - k) <= th.tolerance(k)
    assert torch.equal(bits[1], torch.arange(5000) < 50)
    taus, window, cuts = _select(device, [smooth, tied], [k, k], anchors, gate=0)
    assert window == [0, 1] and cuts == [TIE_NONE, TIE_NONE] and taus[1] == th.KEY_NONE


def test_refresh_without_a_cut_buffer_is_refused():
    """A refreshing step needs its tie cuts (the kernels would read through a null address)."""
    from epi_kernels.launch import Launch, StepFlags

    p = torch.zeros(8)
    launch = Launch([[p, p.clone(), p.clone(), p.clone(), None, p.clone(), torch.zeros(1, dtype=torch.uint8)]])
    with pytest.raises(ValueError, match="tau, cut and counts"):
        _kernels("cpu").fused_step(launch, StepFlags(False, False, False, True, False), *_step_inputs(1, "cpu"),
                                   torch.zeros(1, dtype=torch.int32), None, None, None, None,
                                   torch.zeros(1, 2, dtype=torch.int64))
