"""The Triton select kernel on window histograms whose counts exceed 2**31 (int64 counts): the same
thresholds and repair flags as the reference engine (threshold.window_threshold), bit for bit.
Runs in Triton's interpreter on CPU tensors, or on a GPU."""
import pytest
import torch

from support.devices import TRITON_DEVICES
from support.large_histograms import large_histograms, reference_window_select


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_select_kernel_with_counts_beyond_int32(device, seed):
    from epi_kernels.kernel_sets.triton_kernels import KERNELS, SELECT_TILE
    from epi_kernels.kernels.select import select_kernel

    hist, over, origin, k = large_histograms(seed)
    assert hist.sum(1).max() > 2**31 and k.max() > 2**31  # the point of the test
    tau = torch.zeros(len(k), dtype=torch.int32, device=device)
    repair = torch.full((len(k),), 7, dtype=torch.int32, device=device)
    KERNELS.run(select_kernel, len(k), hist.to(device), over.to(device), origin.to(device), k.to(device), tau, repair,
                TILE=SELECT_TILE)
    assert (tau.tolist(), repair.tolist()) == reference_window_select(hist, over, origin, k)
