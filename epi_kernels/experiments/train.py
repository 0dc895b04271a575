"""The training loop every experiment shares, and how each method configures EPIAdamW."""
from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import EPIAdamW
from ..threshold import isolation_k
from .environment import add_worker_packages, imported_packages

METHODS = ("adamw", "static", "random", "epi", "epi-global", "epi-v")


def sampler(pools: list[tuple], weights: Callable[[int], list[float]] | None = None):
    """Batches drawn with replacement from task pools; `weights(step)` gives the task mix."""
    def draw(rng: random.Random, step: int, n: int) -> list[tuple[str, str]]:
        if weights is None:
            return rng.choices(pools[0], k=n)
        w = weights(step)
        return [rng.choice(pools[rng.choices(range(len(pools)), weights=w)[0]]) for _ in range(n)]
    return draw


WARMUP = 50  # steps of linear learning-rate warm-up at the start of each training run or stage
FINAL_LR = 0.05  # the learning rate decays linearly to this fraction of its peak


def train(model, opt, tokenizer, draw, steps: int, *, batch_size: int, seed: int, desc: str,
          progress: bool, every: int = 0, on_every: Callable[[int], None] | None = None,
          clip: float = 1.0) -> list[float]:
    """`steps` optimizer steps on batches from `draw`; calls `on_every(step)` every `every` steps.
    The learning rate warms up over WARMUP steps and decays linearly to FINAL_LR of its peak;
    gradients are clipped to norm `clip` before the step (HF Trainer's defaults do the same)."""
    rng = random.Random(seed)
    losses = []
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(FINAL_LR, 1.0 - s / steps))
    model.train()
    device = next(model.parameters()).device
    for t in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        batch = tokenizer.batch(draw(rng, t, batch_size), device)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if every and on_every is not None and t % every == 0:
            on_every(t)
    for group in opt.param_groups:  # the next stage starts from the peak learning rate again
        group["lr"] = group.pop("initial_lr")
    return losses


def configure(opt: EPIAdamW, method: str, *, ratio: float, refresh_interval: int, seed: int,
              delay: int = 0) -> None:
    """Turn an optimizer (fresh, or loaded from a checkpoint) into one of the compared methods.
    Its first refresh comes `delay` steps after the next one (default: the next step, whose
    refresh uses the scores' history, e.g. a stage-1 importance).

    adamw   no isolation (EPIAdamW with ratio 0 is torch.optim.AdamW)
    static  one refresh now, never again (CPI-FT-style static isolation)
    random  a fixed random mask of the same ratio per tensor (the control), never refreshed
    epi     a refresh now and every `refresh_interval` steps after (Evolving Parameter Isolation)
    epi-global  the same with the paper's selection: scores divided by their tensor's mean, one
            top-p over all tensors (scope="global")
    epi-v   epi with importance="exp_avg_sq": AdamW's second moment is the score (no score state);
            from a checkpoint, its scores are dropped and its exp_avg_sq takes their place
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    for group in opt.param_groups:
        first = group["epi_step"] + 1 + delay
        group.update(isolation_ratio=0.0 if method == "adamw" else ratio, static=method in ("static", "random"),
                     refresh_interval=refresh_interval, warmup_steps=10**12 if method == "random" else first)
        if method == "epi-global":
            group["scope"] = "global"
        if method == "epi-v":
            group.update(importance="exp_avg_sq", importance_beta=None, importance_dtype=None)
            for p in group["params"]:
                opt.state.get(p, {}).pop("importance", None)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        for group in opt.param_groups:
            for p in group["params"]:
                chosen = torch.zeros(p.numel(), dtype=torch.bool)
                chosen[torch.randperm(p.numel(), generator=g)[:isolation_k(ratio, p.numel())]] = True
                opt.set_isolation_mask(p, chosen.view(p.shape))


def cores() -> int:
    """CPU cores this process may run on (the default number of parallel runs)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_many(fn: Callable, groups: dict, seeds, *, jobs: int, threads: int) -> dict:
    """`fn(*head, seed)` for every group's `head` tuple and every seed, in `jobs` worker processes of
    `threads` torch threads each (in this process when jobs is 1): {group: [records in seed order]}.
    Every call is a whole training run that depends only on its arguments and seed, so the results
    do not depend on `jobs`."""
    calls = [(*head, seed) for head in groups.values() for seed in seeds]
    if jobs == 1 or len(calls) <= 1:
        done = [fn(*call) for call in calls]
    else:  # spawn, not fork: a fork after torch has started its thread pools can deadlock
        with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            done = [future.result() for future in [pool.submit(fn, *call) for call in calls]]
            add_worker_packages(pool.submit(imported_packages).result())  # the model's libraries load there
    n = len(seeds)
    return {group: done[i * n:(i + 1) * n] for i, group in enumerate(groups)}
