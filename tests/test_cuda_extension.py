"""The compiled extension epi_kernels._C on any machine: its constants are the threshold engine's,
a missing GPU or driver is a clear RuntimeError (never a silent no-op), and its fp32 <-> bf16/fp16
conversions (csrc/element.h, run through the host harness) are torch's to the bit.

The kernels' arithmetic against the pure-PyTorch reference is tested in test_fused_backends.py
(the "cuda-host-harness" cases without a GPU, "cuda" with one)."""
import sys

import pytest
import torch

from epi_kernels import launch
from epi_kernels import threshold as th
from kernel_devices import HAS_CUDA, HAS_EXTENSION, NO_EXTENSION
from large_histograms import large_histograms, reference_window_select

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason=NO_EXTENSION)


@pytest.fixture(scope="module")
def C():
    from epi_kernels import _C

    return _C


def test_constants_are_the_reference_engines(C):
    k = C.constants()
    for name in ("KEY_NONE", "MANTISSA_BITS", "WINDOW_OCTAVES", "BIN_SHIFT", "BIN_WIDTH", "WINDOW_BINS"):
        assert k[name] == getattr(th, name), name
    assert (k["CHUNK"], k["TABLE_WIDTH"]) == (launch.CHUNK, len(launch.COLUMNS))
    # the repair digits tile the 31-bit key from the top, and fit the scratch row
    levels = k["RADIX_LEVELS"]
    assert levels[0][0] + levels[0][1] == 31 and levels[-1][0] == 0
    assert all(a[0] == b[0] + b[1] for a, b in zip(levels, levels[1:]))
    assert max(bits for _, bits in levels) <= k["RADIX_BINS"].bit_length() - 1


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_no_gpu_is_a_clear_runtime_error(C):
    with pytest.raises(RuntimeError, match=r"epi_kernels\._C\.device_count: cuda\w+: "):
        C.device_count()
    # a launch, too: the kernel never runs, and the wrapper says so instead of returning
    with pytest.raises(RuntimeError, match=r"epi_kernels\._C\.window_select: cuda\w+: "):
        C.window_select(1, 0, 0, 0, 0, 0, 0, 0)


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

    monkeypatch.setitem(sys.modules, "epi_kernels.cuda_backend", None)  # import now fails
    backends._has_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="epi_kernels._C is installed but does not load"):
            assert "cuda" not in backends.available_backends()
        assert backends.resolve_backend("auto", torch.device("cuda")) in ("triton", "torch")
    finally:
        backends._has_extension.cache_clear()


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
    need = torch.tensor([2**33 + 3], dtype=torch.int64)
    scratch = torch.zeros(1, C.constants()["RADIX_BINS"], dtype=torch.int64)
    C.host.radix_repair(table.data_ptr(), chunks.data_ptr(), 1, 1, C.constants()["DTYPE_F32"], repair.data_ptr(),
                        prefix.data_ptr(), need.data_ptr(), scratch.data_ptr(), tau.data_ptr())
    keys = th.score_keys(scores)
    assert int(tau) == th.exact_threshold([keys], 2**33 + 3) == int(keys[keys > 0].min())
    assert int(repair) == 0 and int(scratch.abs().sum()) == 0
    # a k within the eligible keys
    repair.fill_(1), prefix.zero_(), need.fill_(4)
    C.host.radix_repair(table.data_ptr(), chunks.data_ptr(), 1, 1, C.constants()["DTYPE_F32"], repair.data_ptr(),
                        prefix.data_ptr(), need.data_ptr(), scratch.data_ptr(), tau.data_ptr())
    assert int(tau) == th.exact_threshold([keys], 4)
