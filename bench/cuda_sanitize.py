"""A small run of backend="cuda" that reaches every kernel and code path, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/cuda_sanitize.py
    EPI_CUDA_HOST=1 python bench/cuda_sanitize.py cpu     # the same run in the host harness

fp32/bf16/fp16 params, fp32 and bf16 scores, amsgrad, sizes around the vector width and the chunk,
a misaligned view (scalar path), refreshes answered by the window and by the repair path, a
histogram rebuilt from stored scores, a 20000-element tensor whose gradients are all equal (the tie
pass). Also checks, cheaply, that every refresh isolated exactly what the reference engine says for
the optimizer's own start-of-step scores, tie cut included, and that some refresh was tie cut (exit
status 1 if not).
"""
from __future__ import annotations

import sys

import torch

from epi_kernels import EPIAdamW
from epi_kernels import threshold as th


TIED = -1  # index of the parameter whose gradients are all equal


def params(dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (8,), (9,), (8191,), (8193,), (64, 300), (0,)]
    out = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    out.append(torch.nn.Parameter(torch.randn(5001, generator=g).to(device, dtype)[1:]))  # misaligned
    return out + [torch.nn.Parameter(torch.zeros(20000, device=device, dtype=dtype))]  # TIED: equal gradients


def run(dtype: torch.dtype, score_dtype: torch.dtype, amsgrad: bool, device: str) -> tuple[int, int, int, int]:
    """(mismatches, tensor refreshes, of which repaired, of which tie cut)"""
    ps = params(dtype, device)
    opt = EPIAdamW(ps, backend="cuda", lr=0.01, isolation_ratio=0.05, refresh_interval=2, warmup_steps=1,
                   importance_beta=0.5, importance_dtype=score_dtype, amsgrad=amsgrad)
    g = torch.Generator(device=device).manual_seed(1)
    bad = refreshes = repaired = cuts = 0
    for t in range(6):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, device=device).to(dtype)
            if p is ps[TIED]:
                p.grad = torch.full_like(p, 0.5)  # every score equal: k = 1000 of 20000 tied keys, cut = 1000
            if t == 4:
                p.grad[::10] *= 64  # scores jump above the window: the repair path
        start = [opt.state[p]["importance"].clone() if p in opt.state else None for p in ps]
        anchors = [int(opt.state[p]["threshold_bits"]) if p in opt.state else th.KEY_NONE for p in ps]
        if t == 3:  # as if a checkpoint was loaded: the refresh rebuilds its histograms from the scores
            opt.load_state_dict(opt.state_dict())
        opt.step()
        for p, s, anchor in zip(ps, start, anchors):
            st = opt.state[p]
            if s is None or int(st["refresh_step"]) != opt.param_groups[0]["epi_step"]:
                continue
            keys, k = th.score_keys(s.cpu()), th.isolation_k(0.05, s.numel())
            tau, exact = th.approx_threshold([keys], k, anchor)
            cut = th.tie_cut(keys, tau, k) if exact else th.TIE_NONE
            refreshes, repaired, cuts = refreshes + 1, repaired + exact, cuts + (cut != th.TIE_NONE)
            bad += (int(st["threshold_bits"]), bool(st["threshold_exact"])) != (tau, exact)
            want = (keys > tau) | ((keys == tau) & (torch.arange(keys.numel()) < cut))
            bad += not torch.equal(opt.isolation_mask(p).cpu().reshape(-1), want)
    if device == "cuda":
        torch.cuda.synchronize()
    return bad, refreshes, repaired, cuts


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    bad = 0
    for dtype, score_dtype, amsgrad in [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, True),
                                        (torch.float16, torch.float32, False)]:
        n, refreshes, repaired, cuts = run(dtype, score_dtype, amsgrad, device)
        print(f"{dtype} params, {score_dtype} scores, amsgrad={amsgrad}: {refreshes} tensor refreshes "
              f"({repaired} by the repair path, {cuts} with a tie cut), {n} mismatches with the reference engine")
        bad += n + (cuts == 0)  # the tie pass must have run
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
