"""Host side of the fused kernel backends ("triton" and "cuda"): one flow, two kernel sets.

A step launches the fused kernel once per *launch group*: the tensors sharing device, param dtype,
score dtype and step count (normally one group per param group and dtype). A refresh at step t
needs the window histogram of the start-of-step scores; the fused kernel of step t - 1 counts
exactly those (its new scores) when the host knows t refreshes. At step t, one program per tensor
selects the threshold from that histogram, the repair kernels compute exact thresholds for the
tensors it flags (launched whatever the flags say, so the host never reads them), and the fused
kernel sets the new mask bits as it steps. Thresholds are the reference engine's integers
(:mod:`epi_kernels.threshold`) for the same scores.

Host-side work per step: group tensors, build small address and chunk tables (copied to the
device from pinned memory, asynchronously), compute the AdamW scalars from the CPU step counters.

Tables (read by both kernel sets):
  tensor table int64 [T, 8]: per tensor the addresses of param, grad, exp_avg, exp_avg_sq,
  max_exp_avg_sq (0 without amsgrad), importance and packed mask, then its numel;
  chunk table int32 [P, 2]: per program the tensor index and the chunk index within that tensor;
  a chunk is CHUNK consecutive elements (logical order), so no two programs share a mask byte.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .fused_refresh import FusedRefresh
from .mask import jaccard_counts
from .step_scalars import step_scalars
from .threshold import KEY_NONE, WINDOW_BINS, isolation_k, window_origin

__all__ = ["COLUMNS", "CHUNK", "StepFlags", "Kernels", "Launch", "fused_epi_adamw", "window_thresholds"]

COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "importance", "mask", "numel")
CHUNK = 8192  # elements per program (the CUDA kernels check theirs against it: _C.constants())


class StepFlags(NamedTuple):
    sq: bool  # score signal g*g (else |g|)
    maximize: bool
    amsgrad: bool
    refresh: bool  # set the masks from `tau`, count (isolated, kept) into `counts`
    hist: bool  # count the new scores into window histograms


class Kernels(Protocol):
    """What a kernel backend implements; tensors are int32 on the launch's device, None if unused."""

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor) -> None:
        """Add the window histograms of the stored scores into hist [T, WINDOW_BINS] / over [T]."""

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor) -> None:
        """tau [T] from the window histograms, then the repair path for the tensors it flags
        (repair [T] is left holding the window's flags: 1 where the repair path answered)."""

    def fused_step(self, launch: Launch, scalars: tuple[float, ...], flags: StepFlags, tau: Tensor | None,
                   origin: Tensor | None, hist: Tensor | None, over: Tensor | None, counts: Tensor | None) -> None:
        """The fused step of every element of the launch."""


def chunk_rows(numels: list[int], chunk: int) -> list[tuple[int, int]]:
    """(tensor index, chunk index) for every chunk of every tensor; empty tensors get none."""
    return [(t, c) for t, n in enumerate(numels) for c in range((n + chunk - 1) // chunk)]


def to_device(rows, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table on `device` without a host sync: pinned memory, asynchronous copy
    on the current stream (the caching host allocator keeps the buffer alive until it has run)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Cached:
    """A table kept across steps, with the stream its copy was queued on: a later step on another
    stream waits for that stream first (on the device, no host sync)."""

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.stream = torch.cuda.current_stream(table.device) if table.is_cuda else None

    def get(self) -> Tensor:
        if self.stream is not None:
            current = torch.cuda.current_stream(self.table.device)
            if current != self.stream:
                current.wait_stream(self.stream)
        return self.table


@lru_cache(maxsize=64)
def _address_table(device: torch.device, addresses: tuple[tuple[int, ...], ...], numels: tuple[int, ...]) -> _Cached:
    """The tensor table on `device`. Its content is a function of the addresses and sizes alone,
    so it is cached by them: steps over the same tensors (params and state do not move; the caching
    allocator mostly hands gradients the same blocks) skip building and copying it."""
    return _Cached(to_device([list(a) + [n] for a, n in zip(addresses, numels)], torch.int64, device))


@lru_cache(maxsize=256)
def _chunk_table(device: torch.device, numels: tuple[int, ...]) -> tuple[_Cached, int]:
    rows = chunk_rows(list(numels), CHUNK)
    return _Cached(to_device(rows or [(0, 0)], torch.int32, device)), len(rows)


class Launch:
    """The tensors of one launch group as the kernels see them: contiguous (non-contiguous ones are
    stepped in contiguous copies, written back by :meth:`finish`) and listed in address tables."""

    def __init__(self, idx: list[int], columns: list[list[Tensor | None]]) -> None:
        self.idx = idx
        self.copies: list[tuple[Tensor, Tensor]] = []
        rows = [columns[i] for i in idx]
        if not all(t is None or t.is_contiguous() for row in rows for t in row):
            rows = [self._contiguous(row) for row in rows]
        p = rows[0][0]
        self.device, self.param_dtype, self.score_dtype = p.device, p.dtype, rows[0][5].dtype
        self.numels = tuple(row[0].numel() for row in rows)
        addresses = tuple(tuple(0 if t is None else t.data_ptr() for t in row) for row in rows)
        self.table = _address_table(self.device, addresses, self.numels).get()
        chunks, self.programs = _chunk_table(self.device, self.numels)
        self.chunks = chunks.get()
        self.rows = rows  # keeps the copies alive until the kernels are queued

    def _contiguous(self, row: list[Tensor | None]) -> list[Tensor | None]:
        """Contiguous copies of a row's non-contiguous tensors, written back by :meth:`finish`."""
        row = list(row)
        for j, t in enumerate(row):
            if t is not None and not t.is_contiguous():
                row[j] = t.contiguous()
                if j != 1:  # the gradient is only read
                    self.copies.append((t, row[j]))
        return row

    def zeros(self, *shape: int, dtype=torch.int32) -> Tensor:
        return torch.zeros(len(self.idx), *shape, dtype=dtype, device=self.device)

    def finish(self) -> None:
        for t, c in self.copies:
            t.copy_(c)


def _window_histograms(kernels: Kernels, launch: Launch, origin: Tensor) -> tuple[Tensor, Tensor]:
    """Window histograms of the stored scores (when the previous step did not collect them)."""
    hist, over = launch.zeros(WINDOW_BINS), launch.zeros()
    if launch.programs:
        kernels.window_histogram(launch, origin, hist, over)
    return hist, over


def _select(kernels: Kernels, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor,
            k: Tensor) -> tuple[Tensor, Tensor]:
    """(tau int32 [T], repaired bool [T]): window select, then the repair path for flagged tensors."""
    tau, repair = launch.zeros(), launch.zeros()
    kernels.select(launch, hist, over, origin, k, tau, repair)
    return tau, repair != 0


def _origins(anchor: Tensor) -> Tensor:
    """Window origin per tensor from its previous threshold; 0 where there is none."""
    return torch.where(anchor < KEY_NONE, window_origin(anchor), 0).to(torch.int32)


def _stack(states: list[dict], idx: list[int], key: str) -> Tensor:
    return torch.stack([states[i][key] for i in idx])


def _store(states: list[dict], idx: list[int], values: dict[str, Tensor]) -> None:
    """Copy per-tensor results into the optimizer states, one multi-tensor copy per entry."""
    for key, value in values.items():
        torch._foreach_copy_([states[i][key] for i in idx], list(value.to(states[idx[0]][key].dtype).unbind(0)))


def _refresh(kernels: Kernels, launch: Launch, fr: FusedRefresh, pending: tuple | None):
    """New thresholds of a launch group: (tau, repaired, k, previous isolated counts). `pending`:
    the histograms the previous step collected for these indices, used if they are of these scores."""
    k = to_device([isolation_k(fr.isolation_ratio, n) for n in launch.numels], torch.int32, launch.device)
    origin = _origins(_stack(fr.states, launch.idx, "threshold_bits"))
    if pending is not None and pending[0] == fr.step - 1 and all(
            a is fr.states[i]["importance"] for a, i in zip(pending[1], launch.idx)):
        hist, over = pending[2], pending[3]
    else:
        hist, over = _window_histograms(kernels, launch, origin)
    tau, repaired = _select(kernels, launch, hist, over, origin, k)
    return tau, repaired, k, _stack(fr.states, launch.idx, "isolated_count")


def _launch_groups(params, steps, importances) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, importances[i].dtype, steps[i]), []).append(i)
    return groups


@torch.compiler.disable  # see below
def fused_epi_adamw(kernels: Kernels, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    importances, masks, *, importance_beta, importance, amsgrad, beta1, beta2, lr, weight_decay,
                    eps, maximize, fused_refresh: FusedRefresh | None = None) -> None:
    """The EPI-AdamW step with `kernels`; with `fused_refresh`, also the refresh of the masks (or
    the histograms for the next step's refresh).

    Never traced by torch.compile: the kernels reach tensors through raw addresses and the
    histograms kept for the next step outlive the call, both invisible to dynamo. Traced, the kept
    histograms were freed while their addresses were still used (seen with valgrind in the host
    harness: reads of freed 16 KiB blocks); run as is, a compiled training step is safe."""
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack(state_steps).tolist() if state_steps else []  # CPU tensors unless fused/capturable
    columns = [[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                importances[i], masks[i]] for i, p in enumerate(params)]
    fr = fused_refresh
    previous = {}
    if fr is not None:  # histograms are only ever used by the very next step
        previous = dict(fr.pending)
        fr.pending.clear()
    for (_, _, _, step), idx in _launch_groups(params, steps, importances).items():
        launch = Launch(idx, columns)
        refresh = fr is not None and fr.refresh
        collect = fr is not None and fr.collect
        tau = counts = hist = over = origin = None
        if refresh:
            tau, repaired, k, old_count = _refresh(kernels, launch, fr, previous.get(tuple(idx)))
            counts = launch.zeros(2)
        if collect:
            origin = _origins(tau if refresh else _stack(fr.states, idx, "threshold_bits"))
            hist, over = launch.zeros(WINDOW_BINS), launch.zeros()
        scalars = step_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                               importance_beta=importance_beta, step=step)
        if launch.programs:
            kernels.fused_step(launch, scalars, StepFlags(importance == "sq", maximize, amsgrad, refresh, collect),
                               tau, origin, hist, over, counts)
        launch.finish()
        if collect:
            fr.pending[tuple(idx)] = (fr.step, [fr.states[i]["importance"] for i in idx], hist, over)
        if refresh:
            count = counts[:, 0].to(torch.int64)
            _store(fr.states, idx, {
                "isolation_overlap": jaccard_counts(counts[:, 1].to(torch.int64), old_count, count),
                "threshold_bits": tau, "isolation_k": k, "isolated_count": count, "threshold_exact": repaired,
                "refresh_step": torch.full_like(count, fr.step)})


def window_thresholds(kernels: Kernels, scores: list[Tensor], ks: list[int],
                      anchors: list[int]) -> tuple[Tensor, Tensor]:
    """Thresholds of score tensors (one launch group) by the kernels alone: window histograms of the
    scores, select, repair. Returns (tau int32 [T], repaired bool [T]). For tests and benchmarks."""
    columns = [[s, None, None, None, None, s, None] for s in scores]
    launch = Launch(list(range(len(scores))), columns)
    origin = _origins(torch.tensor(anchors, dtype=torch.int32, device=launch.device))
    hist, over = _window_histograms(kernels, launch, origin)
    k = torch.tensor(ks, dtype=torch.int32, device=launch.device)
    return _select(kernels, launch, hist, over, origin, k)
