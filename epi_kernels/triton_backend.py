"""backend="triton": the fused one-pass step and refreshes that never wait for the device.

A step launches :func:`fused_step_kernel` once per *launch group*: the tensors sharing device,
param dtype, score dtype and step count (normally one group per param group and dtype). A refresh
at step t needs the window histogram of the start-of-step scores; the fused kernel of step t - 1
counts exactly those (its new scores) when the host knows t refreshes. At step t, one program per
tensor selects the threshold from that histogram (:mod:`.kernels.select`), the repair kernels
compute exact thresholds for the tensors it flags (:mod:`.kernels.repair`, launched whatever the
flags say, so the host never reads them), and the fused kernel sets the new mask bits as it steps.
Thresholds are the reference engine's integers (:mod:`epi_kernels.threshold`) for the same scores.

Host-side work per step: group tensors, build small address and chunk tables (copied to the device
from pinned memory, asynchronously), compute the AdamW scalars from the CPU step counters.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton.language as tl
from torch import Tensor

from .kernels.fused_step import fused_step_kernel
from .kernels.histogram import histogram_kernel
from .kernels.repair import LEVELS, SCRATCH, radix_count_kernel, radix_select_kernel
from .kernels.select import select_kernel
from .kernels.tensor_table import chunk_rows, to_device
from .fused_refresh import FusedRefresh
from .mask import jaccard_counts
from .step_scalars import step_scalars
from .threshold import KEY_NONE, WINDOW_BINS, isolation_k, window_origin

__all__ = ["triton_epi_adamw", "window_thresholds"]

BLOCK = 1024  # elements per tile
TILES = 8  # tiles per program: a program's chunk is 8192 elements, one histogram flush
CHUNK = BLOCK * TILES
SELECT_TILE = 1024
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@lru_cache(maxsize=256)
def _chunk_table(device: torch.device, numels: tuple[int, ...]) -> tuple[Tensor, int]:
    rows = chunk_rows(list(numels), CHUNK)
    return to_device(rows or [(0, 0)], torch.int32, device), len(rows)


class _Launch:
    """The tensors of one launch group as the kernels see them: contiguous (non-contiguous ones are
    stepped in contiguous copies, written back by :meth:`finish`) and listed in address tables."""

    def __init__(self, idx: list[int], columns: list[list[Tensor | None]]) -> None:
        self.idx = idx
        self.copies: list[tuple[Tensor, Tensor]] = []
        rows = []
        for i in idx:
            row = list(columns[i])
            for j, t in enumerate(row):
                if t is not None and not t.is_contiguous():
                    row[j] = t.contiguous()
                    if j != 1:  # the gradient is only read
                        self.copies.append((t, row[j]))
            rows.append(row)
        p = rows[0][0]
        self.device, self.p_type, self.s_type = p.device, _TL[p.dtype], _TL[rows[0][5].dtype]
        self.numels = [row[0].numel() for row in rows]
        self.table = to_device([[0 if t is None else t.data_ptr() for t in row] + [n]
                                for row, n in zip(rows, self.numels)], torch.int64, self.device)
        self.chunks, self.programs = _chunk_table(self.device, tuple(self.numels))
        self.rows = rows  # keeps the copies alive until the kernels are queued

    def zeros(self, *shape: int, dtype=torch.int32) -> Tensor:
        return torch.zeros(len(self.idx), *shape, dtype=dtype, device=self.device)

    def finish(self) -> None:
        for t, c in self.copies:
            t.copy_(c)


def _window_histograms(launch: _Launch, origin: Tensor) -> tuple[Tensor, Tensor]:
    """Window histograms of the stored scores (when the previous step did not collect them)."""
    hist, over = launch.zeros(WINDOW_BINS), launch.zeros()
    if launch.programs:
        histogram_kernel[(launch.programs,)](launch.table, launch.chunks, origin, hist, over,
                                             S_TYPE=launch.s_type, BLOCK=BLOCK, TILES=TILES)
    return hist, over


def _select(launch: _Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(tau int32 [T], repaired bool [T]): window select, then the repair path for flagged tensors."""
    tau, repair = launch.zeros(), launch.zeros()
    select_kernel[(len(launch.idx),)](hist, over, origin, k, tau, repair, TILE=SELECT_TILE)
    repaired = repair != 0
    if launch.programs:
        prefix, need, scratch = launch.zeros(), k.clone(), launch.zeros(SCRATCH)
        for level, (shift, bits) in enumerate(LEVELS):
            radix_count_kernel[(launch.programs,)](launch.table, launch.chunks, repair, prefix, scratch,
                                                   S_TYPE=launch.s_type, SHIFT=shift, BITS=bits,
                                                   BLOCK=BLOCK, TILES=TILES)
            radix_select_kernel[(len(launch.idx),)](scratch, repair, prefix, need, tau, SHIFT=shift, BITS=bits,
                                                    FIRST=level == 0, LAST=level == len(LEVELS) - 1,
                                                    TILE=SELECT_TILE)
    return tau, repaired


def _origins(anchor: Tensor) -> Tensor:
    """Window origin per tensor from its previous threshold; 0 where there is none."""
    return torch.where(anchor < KEY_NONE, window_origin(anchor), 0).to(torch.int32)


def _stack(states: list[dict], idx: list[int], key: str) -> Tensor:
    return torch.stack([states[i][key] for i in idx])


def _store(states: list[dict], idx: list[int], values: dict[str, Tensor]) -> None:
    """Copy per-tensor results into the optimizer states, one multi-tensor copy per entry."""
    for key, value in values.items():
        torch._foreach_copy_([states[i][key] for i in idx], list(value.to(states[idx[0]][key].dtype).unbind(0)))


def _refresh(launch: _Launch, fr: FusedRefresh, pending: tuple | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """New thresholds of a launch group: (tau, repaired, k, previous isolated counts). `pending`:
    the histograms the previous step collected for these indices, used if they are of these scores."""
    k = to_device([isolation_k(fr.isolation_ratio, n) for n in launch.numels], torch.int32, launch.device)
    origin = _origins(_stack(fr.states, launch.idx, "threshold_bits"))
    if pending is not None and pending[0] == fr.step - 1 and all(
            a is fr.states[i]["importance"] for a, i in zip(pending[1], launch.idx)):
        hist, over = pending[2], pending[3]
    else:
        hist, over = _window_histograms(launch, origin)
    tau, repaired = _select(launch, hist, over, origin, k)
    return tau, repaired, k, _stack(fr.states, launch.idx, "isolated_count")


def _launch_groups(params, steps, importances) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, importances[i].dtype, steps[i]), []).append(i)
    return groups


def triton_epi_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, importances, masks, *,
                     importance_beta, importance, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize,
                     fused_refresh: FusedRefresh | None = None) -> None:
    """The EPI-AdamW step of epi_adamw(backend="triton"); with `fused_refresh`, also the refresh of
    the masks (or the histograms for the next step's refresh)."""
    torch._foreach_add_(state_steps, 1)
    steps = [s.item() for s in state_steps]  # CPU tensors unless fused/capturable
    columns = [[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                importances[i], masks[i]] for i, p in enumerate(params)]
    fr = fused_refresh
    previous = {}
    if fr is not None:  # histograms are only ever used by the very next step
        previous = dict(fr.pending)
        fr.pending.clear()
    for (_, _, _, step), idx in _launch_groups(params, steps, importances).items():
        launch = _Launch(idx, columns)
        refresh = fr is not None and fr.refresh
        collect = fr is not None and fr.collect
        dummy = launch.table
        tau = counts = hist = over = origin = dummy
        if refresh:
            tau, repaired, k, old_count = _refresh(launch, fr, previous.get(tuple(idx)))
            counts = launch.zeros(2)
        if collect:
            origin = _origins(tau if refresh else _stack(fr.states, idx, "threshold_bits"))
            hist, over = launch.zeros(WINDOW_BINS), launch.zeros()
        scalars = step_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                               importance_beta=importance_beta, step=step)
        if launch.programs:
            fused_step_kernel[(launch.programs,)](
                launch.table, launch.chunks, tau, origin, hist, over, counts, *scalars,
                P_TYPE=launch.p_type, S_TYPE=launch.s_type, SQ=importance == "sq", MAXIMIZE=maximize,
                AMSGRAD=amsgrad, REFRESH=refresh, HIST=collect, BLOCK=BLOCK, TILES=TILES)
        launch.finish()
        if collect:
            fr.pending[tuple(idx)] = (fr.step, [fr.states[i]["importance"] for i in idx], hist, over)
        if refresh:
            count = counts[:, 0].to(torch.int64)
            _store(fr.states, idx, {
                "isolation_overlap": jaccard_counts(counts[:, 1].to(torch.int64), old_count, count),
                "threshold_bits": tau, "isolation_k": k, "isolated_count": count, "threshold_exact": repaired,
                "refresh_step": torch.full_like(count, fr.step)})


def window_thresholds(scores: list[Tensor], ks: list[int], anchors: list[int]) -> tuple[Tensor, Tensor]:
    """Thresholds of score tensors (one launch group) by the kernels alone: window histograms of the
    scores, select, repair. Returns (tau int32 [T], repaired bool [T]). For tests and benchmarks."""
    columns = [[s, None, None, None, None, s, None] for s in scores]
    launch = _Launch(list(range(len(scores))), columns)
    origin = _origins(torch.tensor(anchors, dtype=torch.int32, device=launch.device))
    hist, over = _window_histograms(launch, origin)
    k = torch.tensor(ks, dtype=torch.int32, device=launch.device)
    return _select(launch, hist, over, origin, k)
