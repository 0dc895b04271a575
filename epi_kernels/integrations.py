"""Hooks into training frameworks: a Hugging Face Trainer callback (needs transformers) and the
whole-model isolation summary it logs."""
from __future__ import annotations

from typing import Iterable

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is optional: EPICallback then raises when created
    TrainerCallback = object

__all__ = ["EPICallback", "isolation_summary"]


def isolation_summary(optimizer) -> dict[str, float]:
    """Whole-model figures of the latest refresh: isolated fraction, mean overlap (Jaccard) with
    the previous masks, fraction of tensors whose threshold came from the exact path."""
    stats = optimizer.isolation_stats()
    numel = sum(s["numel"] for s in stats) or 1
    overlaps = [s["overlap"] for s in stats if s["overlap"] == s["overlap"]]  # not NaN
    return {"epi/isolated_fraction": sum(s["selected"] for s in stats) / numel,
            "epi/overlap": sum(overlaps) / len(overlaps) if overlaps else float("nan"),
            "epi/exact_fraction": sum(s["exact"] for s in stats) / max(1, len(stats)),
            "epi/refresh_step": max((s["refresh_step"] for s in stats), default=0)}


def _epi(optimizer):
    """The EPIAdamW inside a framework's optimizer wrapper (accelerate's AcceleratedOptimizer)."""
    while not hasattr(optimizer, "isolation_stats") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if hasattr(optimizer, "isolation_stats") else None


class EPICallback(TrainerCallback):
    """Hugging Face Trainer callback: logs EPI isolation statistics after every refresh (as
    `epi/...` entries of the Trainer's logs; also kept in `history`) and requests a refresh at
    stage boundaries: `stage_boundaries` are global steps after which the next optimizer step
    refreshes the masks (e.g. where the training data switches task)."""

    def __init__(self, stage_boundaries: Iterable[int] = ()) -> None:
        if TrainerCallback is object:
            raise ImportError("EPICallback needs transformers (pip install transformers)")
        self.stage_boundaries = set(stage_boundaries)
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] | None = None
        self._last_refresh = 0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = _epi(optimizer)
        if opt is None:
            return
        summary = isolation_summary(opt)
        if summary["epi/refresh_step"] > self._last_refresh:
            self._last_refresh = summary["epi/refresh_step"]
            self._pending = {**summary, "step": state.global_step}
            self.history.append(self._pending)
            control.should_log = True
        if state.global_step in self.stage_boundaries:
            opt.request_refresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs is not None:
            logs.update({k: v for k, v in self._pending.items() if k != "step"})
            self._pending = None
