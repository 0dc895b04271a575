"""Window histograms whose counts exceed 2**31 (a tensor may hold more elements than int32 counts),
and the reference engine's answer for them: the kernels' window select must agree bit for bit."""
import torch

from epi_kernels import threshold as th


def reference_window_select(hist, over, origin, k):
    """(tau list, repair-flag list) of threshold.window_threshold, as the select kernels store them."""
    want_tau, want_repair = [], []
    for t in range(len(k)):
        found = th.window_threshold(hist[t], int(over[t]), int(k[t]), int(origin[t])) if origin[t] > 0 else None
        want_tau.append(th.KEY_NONE if found is None else found)
        want_repair.append(int(found is None and int(k[t]) >= 1))
    return want_tau, want_repair


def large_histograms(seed, tensors=12):
    """Window histograms with bins and totals beyond 2^31: sparse bins of mixed magnitudes (up to
    ~2^33), `over` up to ~2^34, and k picked inside a random bin (the window answers or the bin is too
    coarse), above the window (a miss), beyond every count, or 0."""
    g = torch.Generator().manual_seed(seed)
    bins = th.WINDOW_BINS
    scale = torch.tensor([0, 1, 1 << 10, 1 << 20, 1 << 28, 1 << 31, 1 << 33], dtype=torch.int64)
    hist = torch.zeros(tensors, bins, dtype=torch.int64)
    for t in range(tensors):
        nonzero = torch.randperm(bins, generator=g)[:int(torch.randint(1, 200, (1,), generator=g))]
        size = scale[torch.randint(0, len(scale), (len(nonzero),), generator=g)]
        hist[t, nonzero] = (torch.rand(len(nonzero), generator=g, dtype=torch.float64) * size).long() + (size > 0).long()
    over = (torch.rand(tensors, generator=g, dtype=torch.float64) *
            scale[torch.randint(0, len(scale), (tensors,), generator=g)].double() * 2).long()
    origin = (torch.randint(1, (2**31 - th.BIN_WIDTH * bins) // th.BIN_WIDTH, (tensors,), generator=g)
              * th.BIN_WIDTH).to(torch.int32)
    origin[0] = 0  # no window: repair
    k = torch.zeros(tensors, dtype=torch.int64)
    for t in range(tensors):
        suffix = hist[t].flip(0).cumsum(0).flip(0) + over[t]
        kind = int(torch.randint(0, 6, (1,), generator=g))
        nonzero = hist[t].nonzero().flatten()
        if kind <= 2 and len(nonzero):  # inside a populated bin
            b = int(nonzero[torch.randint(0, len(nonzero), (1,), generator=g)])
            above = int(suffix[b + 1]) if b + 1 < bins else int(over[t])
            k[t] = above + 1 + int(torch.randint(0, 2**62, (1,), generator=g)) % int(hist[t, b])
        elif kind == 3:  # within `over`: a miss
            k[t] = max(1, int(over[t]) - int(torch.randint(0, 1000, (1,), generator=g)))
        elif kind == 4:  # more than the window holds: a miss
            k[t] = int(suffix[0]) + 1 + int(torch.randint(0, 2**40, (1,), generator=g))
        # kind 5: k = 0, nothing to isolate
    return hist, over, origin, k


