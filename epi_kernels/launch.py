"""What the kernel sets launch over: the address and chunk tables of a launch group (their layout
is :mod:`epi_kernels.abi`'s), and the kernel-level threshold steps (window histogram, select +
repair) written once for both kernel sets against the :class:`Kernels` protocol.
"""
from __future__ import annotations

from collections import namedtuple
from functools import lru_cache
from typing import Protocol

import torch
from torch import Tensor

from .abi import CHUNK, COLUMNS, FLAGS, TIE_NONE, WINDOW_BINS
from .normalise import EXPONENTS
from .threshold import KEY_NONE, window_origin

__all__ = ["StepFlags", "Kernels", "Launch", "kernel_window_histograms", "kernel_select", "kernel_global_select",
           "score_launch", "origins", "to_device"]


class StepFlags(namedtuple("StepFlagFields", FLAGS, defaults=(False,) * len(FLAGS))):
    """What a fused step may do: one bool per abi.FLAGS name (sq: score signal g*g, else |g|;
    maximize; amsgrad; refresh: set the masks from `tau`, count (isolated, kept) into `counts`;
    collect: count the new scores into window histograms; v_scores: the scores are exp_avg_sq, no
    score column of their own). Both kernel sets take it as one int32 bit set (:meth:`bits`) read
    at run time, so a flag costs no compiled variant; only dtypes, amsgrad and alignment select one.
    refresh/collect happen where the control words allow them too. A new flag is a new name in
    abi.FLAGS (and a StepHyper field of that name, or a value the caller decides)."""

    __slots__ = ()

    @classmethod
    def of(cls, hyper, **decided: bool) -> StepFlags:
        """The flags of a step: each one `decided` by the caller (refresh, collect), else the
        attribute of the same name of `hyper` (a :class:`~epi_kernels.step_records.StepHyper`)."""
        return cls(*(decided[f] if f in decided else bool(getattr(hyper, f)) for f in cls._fields))

    @classmethod
    def from_bits(cls, bits: int) -> StepFlags:
        return cls(*(bool(bits >> i & 1) for i in range(len(cls._fields))))

    def bits(self) -> int:
        return sum(1 << i for i, on in enumerate(self) if on)


class Kernels(Protocol):
    """What a kernel backend implements; tensors live on the launch's device (None if unused). Counts
    that can reach a tensor's size are int64 (hist, over, counts, k); keys and flags are int32
    (tau, origin, repair)."""

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor,
                         means: Tensor | None = None) -> None:
        """Add the window histograms of the stored scores into hist [T, WINDOW_BINS] / over [T];
        with `means` (float32 [T], scope="global"), of every tensor's scores over its mean into
        row 0, around origin[0]."""

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor, cut: Tensor, gate: Tensor | None = None,
               means: Tensor | None = None) -> None:
        """tau [T] from the window histograms, then the repair path for the tensors it flags
        (repair [T] is left holding the window's flags: 1 where the repair path answered), then the
        tie cut (threshold.tie_cuts) of repaired tensors whose ties overflow: cut int64 [T] comes
        filled with TIE_NONE and is written only for those. A 0-dim int32 `gate` of 0 turns the
        repair path off (a capturable step that does not refresh). With `means` (scope="global"),
        one selection over every tensor's scores over its mean: hist, over, origin, k, tau and
        repair have one row, cut has T (the group's tie rule)."""

    def means(self, launch: Launch, gate: Tensor, sums: Tensor, means: Tensor) -> None:
        """scope="global": each tensor's exponent sums (int64 [T, 256], zeroed) and mean (float32
        [T]) of its stored scores (normalise.py); the sums stay 0 where the 0-dim `gate` is 0."""

    def raw_thresholds(self, launch: Launch, means: Tensor, tau: Tensor, lo: Tensor, hi: Tensor) -> None:
        """scope="global": the raw keys lo / hi (int32 [T]) that select each tensor's keys over its
        mean >= tau[0] / > tau[0] (kernels/means.py)."""

    def fused_step(self, launch: Launch, flags: StepFlags, scalars: Tensor, control: Tensor, tau: Tensor | None,
                   cut: Tensor | None, origin: Tensor | None, hist: Tensor | None, over: Tensor | None,
                   counts: Tensor | None, above: Tensor | None = None) -> None:
        """The fused step of every element of the launch, with each tensor's scalars (float32
        [T, len(abi.SCALARS)]) and the control words (int32 [len(abi.CONTROL)]) from device memory;
        a refresh sets mask bit i of tensor t to ``key >= tau[t]`` before the tie cut ``i < cut[t]``
        and ``key >= above[t]`` from it on (`above` None: tau[t] + 1)."""


def chunk_rows(numels: list[int], chunk: int) -> list[tuple[int, int]]:
    """(tensor index, chunk index) for every chunk of every tensor; empty tensors get none."""
    return [(t, c) for t, n in enumerate(numels) for c in range((n + chunk - 1) // chunk)]


def to_device(rows, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table on `device` without a host sync: pinned memory, asynchronous copy
    on the current stream (the caching host allocator keeps the buffer alive until it has run)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    t = t.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_SOURCES.append(t)  # every replay of the captured copy reads this buffer again
    return t.to(device, non_blocking=True)


_CAPTURED_SOURCES: list[Tensor] = []  # host sides of tables copied inside a CUDA graph capture: never freed


class _Cached:
    """A table kept across steps, with the stream its copy was queued on: a later step on another
    stream waits for that stream first (on the device, no host sync)."""

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.stream = torch.cuda.current_stream(table.device) if table.is_cuda else None

    def get(self) -> Tensor:
        if self.stream is not None:
            current = torch.cuda.current_stream(self.table.device)
            # inside a graph capture the copy was made before it (a capture may not wait on work
            # outside it), or in it, on this stream
            if current != self.stream and not torch.cuda.is_current_stream_capturing():
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


_MASK = COLUMNS.index("mask")


class Launch:
    """The tensors of one launch group as the kernels see them: one row of abi.COLUMNS tensors each
    (None for an unused column), contiguous (non-contiguous ones are stepped in contiguous copies,
    written back by :meth:`finish`) and listed in address tables."""

    def __init__(self, rows: list[list[Tensor | None]]) -> None:
        self.tensors = len(rows)
        self.copies: list[tuple[Tensor, Tensor]] = []
        # one flat pass per question: this runs for every tensor of every step (host time)
        flat = [t for row in rows for t in row if t is not None]
        if not all([t.is_contiguous() for t in flat]):
            rows = [self._contiguous(row) for row in rows]
        p = rows[0][0]
        self.device, self.param_dtype, self.score_dtype = p.device, p.dtype, rows[0][5].dtype
        self.numels = tuple([row[0].numel() for row in rows])
        addresses = tuple([tuple([0 if t is None else t.data_ptr() for t in row]) for row in rows])
        # 16-byte aligned element columns (the mask is read bytewise): the kernels' vector path
        self.aligned = not any([a & 15 for row in addresses for a in row[:_MASK]])
        self.table = _address_table(self.device, addresses, self.numels).get()
        chunks, self.programs = _chunk_table(self.device, self.numels)
        self.chunks = chunks.get()
        self.rows = rows  # keeps the copies alive until the kernels are queued

    def _contiguous(self, row: list[Tensor | None]) -> list[Tensor | None]:
        """Contiguous copies of a row's non-contiguous tensors, written back by :meth:`finish`."""
        row, made = list(row), {}
        for j, t in enumerate(row):
            if t is not None and not t.is_contiguous():
                if id(t) in made:  # one tensor in two columns (v_scores: exp_avg_sq is the score): one copy
                    row[j] = made[id(t)]
                    continue
                row[j] = made[id(t)] = t.contiguous()
                if j != 1:  # the gradient is only read
                    self.copies.append((t, row[j]))
        return row

    def zeros(self, *shape: int, dtype=torch.int32) -> Tensor:
        return torch.zeros(self.tensors, *shape, dtype=dtype, device=self.device)

    def finish(self) -> None:
        for t, c in self.copies:
            t.copy_(c)


def kernel_window_histograms(kernels: Kernels, launch: Launch, origin: Tensor) -> tuple[Tensor, Tensor]:
    """Window histograms of the stored scores (when the previous step did not collect them)."""
    hist, over = launch.zeros(WINDOW_BINS, dtype=torch.int64), launch.zeros(dtype=torch.int64)
    if launch.programs:
        kernels.window_histogram(launch, origin, hist, over)
    return hist, over


def kernel_select(kernels: Kernels, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor,
                  k: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(tau int32 [T], repaired bool [T], cut int64 [T]): window select, then the repair path and
    the tie cuts for flagged tensors."""
    tau, repair = launch.zeros(), launch.zeros()
    cut = torch.full((launch.tensors,), TIE_NONE, dtype=torch.int64, device=launch.device)
    kernels.select(launch, hist, over, origin, k, tau, repair, cut, gate)
    return tau, repair != 0, cut


def kernel_global_select(kernels: Kernels, launch: Launch, anchor: Tensor, k: Tensor,
                         gate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """scope="global": one selection over the launch's tensors' scores, each divided by its mean
    (normalise.py), with the reference's integers (refresh._refresh_group, threshold="approx"):
    (tau int32 [1] on the normalised keys, repaired bool [1], the raw thresholds lo and hi int32 [T]
    the fused step applies, cut int64 [T]). `anchor` int32 [1]: the group's previous threshold;
    `k` int64 [1]; where the 0-dim int32 `gate` is 0, the passes over the scores do nothing."""
    means, lo, hi = launch.zeros(dtype=torch.float32), launch.zeros(), launch.zeros()
    tau, repair = (torch.zeros(1, dtype=torch.int32, device=launch.device) for _ in range(2))
    hist = torch.zeros(1, WINDOW_BINS, dtype=torch.int64, device=launch.device)
    over = torch.zeros(1, dtype=torch.int64, device=launch.device)
    origin = torch.where(gate != 0, origins(anchor), 0).to(torch.int32)
    cut = torch.full((launch.tensors,), TIE_NONE, dtype=torch.int64, device=launch.device)
    if launch.programs:
        kernels.means(launch, gate, launch.zeros(EXPONENTS, dtype=torch.int64), means)
        kernels.window_histogram(launch, origin, hist, over, means)
    kernels.select(launch, hist, over, origin, k, tau, repair, cut, gate, means)
    kernels.raw_thresholds(launch, means, tau, lo, hi)
    return tau, repair != 0, lo, hi, cut


def score_launch(scores: list[Tensor]) -> Launch:
    """A launch over score tensors alone, for the kernels that only read scores (the param column,
    which only gives the launch its device and dtype, holds the scores too)."""
    return Launch([[s, None, None, None, None, s, None] for s in scores])


def origins(anchor: Tensor) -> Tensor:
    """Window origin per tensor from its previous threshold; 0 where there is none."""
    return torch.where(anchor < KEY_NONE, window_origin(anchor), 0).to(torch.int32)
