"""EPIAdamW: torch.optim.AdamW with Evolving Parameter Isolation (DESIGN.md, "Semantics").

The class validates (:mod:`~epi_kernels.settings`), keeps one record per param group
(:mod:`~epi_kernels.group_record`: its refresh schedule, :mod:`~epi_kernels.schedule`), builds each
group's step records (:mod:`~epi_kernels.step_records`) and calls the one functional entry
(:func:`~epi_kernels.functional.epi_adamw`). What wrappers put in its groups' place and the masks of
model parameters are :mod:`~epi_kernels.layouts`'; the reference refresh is
:mod:`~epi_kernels.refresh`'.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .functional import epi_adamw
from .grad_scaler import unscale_or_skip
from .group_record import GroupRecord
from .layouts import Layouts, is_given
from .mask import isolated_indices
from .settings import (check_loaded_groups, check_score_source, check_stepped_params, checked_settings,
                       fill_defaults, settings_of, unchanged)
from .sharding import is_sharded, local
from .loading import protect_epi_entries, restore_epi_entries
from .state import init_state, tensor_step
from .step_driver import RefreshPlan
from .step_records import StepHyper, StepTensors

__all__ = ["EPIAdamW"]


def _whole(t: Tensor) -> Tensor:
    return t


class EPIAdamW(Optimizer):
    """AdamW that freezes, per tensor, the top `isolation_ratio` fraction of elements by importance.

    Importance is an EMA of g^2 (or |g|) updated every step for every element with a gradient.
    Every `refresh_interval` optimizer steps (after `warmup_steps`, default = `refresh_interval`)
    the isolation mask is recomputed from the scores at the start of the step; isolated elements
    get no Adam update and no weight decay (bit-identical), while their moments and scores keep
    updating. With ``isolation_ratio=0`` this is ``torch.optim.AdamW``.

    AdamW arguments and defaults are torch's. EPI arguments (each also a param-group key):
    isolation_ratio (0.01), refresh_interval (100), warmup_steps (None), importance_beta (None: 0.99),
    importance ("sq" | "abs" | "exp_avg_sq": AdamW's own second moment, no score state),
    scope ("tensor" | "global"), threshold ("approx" | "exact"), static (False: refresh once,
    CPI-FT style), importance_dtype (None: torch.float32 | torch.bfloat16),
    backend ("auto" or a registered backend: "torch" | "compiled" | "triton" | "cuda").
    """

    # GradScaler hands this optimizer its scale and overflow flag (as it does torch's fused Adam)
    # instead of unscaling the gradients itself and skipping step() on overflow (grad_scaler.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        isolation_ratio: float = 0.01,
        refresh_interval: int = 100,
        warmup_steps: int | None = None,
        importance_beta: float | None = None,
        importance: str = "sq",
        scope: str = "tensor",
        threshold: str = "approx",
        static: bool = False,
        importance_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            isolation_ratio=isolation_ratio, refresh_interval=refresh_interval,
            warmup_steps=warmup_steps, importance_beta=importance_beta, importance=importance,
            scope=scope, threshold=threshold, static=static, importance_dtype=importance_dtype,
            backend=backend,
        )
        defaults.update(checked_settings(defaults))
        # one record per param group, by the group's identity: a wrapper may step a group alone by
        # putting a list of just that group in param_groups (DeepSpeed ZeRO 1/2 does)
        self._records: dict[int, GroupRecord] = {}
        self._layouts = Layouts()  # what wrappers put in the groups' place (ZeRO), and model parameters' masks
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f" in param group {len(self.param_groups)}"
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # (torch refuses a set itself; a duplicate is refused here)
            param_group["params"] = params = list(params)
            seen: set[int] = set()
            twice = next((i for i, p in enumerate(params) if id(p) in seen or seen.add(id(p))), None)
            if twice is not None:
                raise ValueError(f"EPIAdamW: parameter {twice}{where} appears in it twice (a duplicate would be "
                                 "stepped twice per step; torch deprecates it too)")
        merged = {**self.defaults, **param_group}
        if merged["importance"] == "exp_avg_sq":  # the defaults' score settings do not apply to it
            merged.update((k, param_group.get(k)) for k in ("importance_beta", "importance_dtype"))
        param_group.update(checked_settings(merged, where))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("epi_step", 0)
        self._records[id(group)] = GroupRecord(group, settings_of(group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (also load_state_dict's way of putting the loaded groups in place of the current ones: each
        # loaded group keeps what the group at its position was given)
        before = self._group_records() if "_records" in self.__dict__ else []
        super().__setstate__(state)
        self._records = {id(g): GroupRecord(g, given=list(before[i].given) if i < len(before) else [])
                         for i, g in enumerate(self.param_groups)}  # (validated at the first step)
        self._layouts = Layouts()
        for group in self.param_groups:
            fill_defaults(group, self.defaults)
            for p in group["params"]:
                tensor_step(self.state.get(p, {}), p, group)

    def _group_records(self) -> list[GroupRecord]:
        """The records of the current param groups, in order (a group put in place by hand gets a new one)."""
        out = []
        for group in self.param_groups:
            record = self._records.get(id(group))
            if record is None or record.group is not group:  # (an id of a group gone, reused)
                record = self._records[id(group)] = GroupRecord(group)
            out.append(record)
        return out

    def _state_of(self, p: Tensor, group: dict) -> dict:
        # (`p in` a dict of tensors hashes in Python: skipped where no partition is held, the usual case)
        part = self._layouts.partitions.get(p) if self._layouts.partitions else None
        return init_state(self.state[p], p, group, pieces=len(part[1].pieces) if part else None)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step; `closure` is evaluated first, with grad enabled."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None)
        if check is not None:
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (record, stepped params, backend, whether it decides on the device): all checked first
        for i, record in enumerate(self._check_settings()):
            group = record.group
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                backend = backends.resolve(group["backend"], params[0].device)
                check_stepped_params(group, params, backend, self.state, f" of param group {i}")
                sharded = self._sharded(params)
                if sharded:
                    self._layouts.check_selection(group, params, f" in param group {i}")
                work.append((record, params, backend, group["capturable"] and backend.refreshes(group, sharded)))
        on_device = bool(work) and all(w[3] for w in work)  # no host read of the GradScaler's flag either
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and not on_device:
            # the refresh schedule and the step counts live on the host: a replayed graph would
            # repeat one step's decisions (no refresh, ever), so refuse instead of going wrong quietly
            raise RuntimeError("EPIAdamW.step can be captured in a CUDA graph only with capturable=True, "
                               "backend='triton' or 'cuda', threshold='approx' and unsharded params in every "
                               "param group, and scope='tensor' or scope='global' over params of one device and "
                               "dtype (the others decide refreshes on the host)")
        skip = unscale_or_skip(getattr(self, "found_inf", None), getattr(self, "grad_scale", None),
                               [p for w in work for p in w[1]], on_device)
        if skip is True:
            return loss  # GradScaler found inf/NaN gradients: the whole step is skipped
        for record, params, backend, decides in work:
            self._step_group(record, params, backend, decides, skip if on_device else None)
        return loss

    @torch.compiler.disable  # host-side bookkeeping: traced, it would guard on every setting's value
    def _check_settings(self) -> list[GroupRecord]:
        """Re-validate the groups whose settings changed since last validated (set by a scheduler or
        the user between steps), all of them before any normalised value is stored back."""
        records = self._group_records()
        changed = [(i, r) for i, r in enumerate(records) if not unchanged(r.validated, r.group)]
        checked = [checked_settings(r.group, f" in param group {i}") for i, r in changed]
        for (i, record), values in zip(changed, checked):  # (a changed `importance` is a changed group)
            check_score_source(record.group, values["importance"], i, self.state)
        for i, record in enumerate(records):
            self._layouts.check(record, f"param group {i}", self.state, self)
        for (_, record), values in zip(changed, checked):
            record.group.update(values)
            record.validated = settings_of(record.group)
        return records

    def _sharded(self, params: list[Tensor]) -> bool:
        partitions = self._layouts.partitions
        return any(is_sharded(p) or (partitions and p in partitions) for p in params)

    def _step_group(self, record: GroupRecord, params: list[Tensor], backend: backends.Backend, on_device: bool,
                    skip: Tensor | None) -> None:
        group = record.group
        states = [self._state_of(p, group) for p in params]
        partitioned = any(p in self._layouts.partitions for p in params)
        sharded = self._sharded(params)
        hyper = StepHyper.of(group)
        tensors = StepTensors.of(params, states, hyper, local if sharded else _whole)  # FSDP2: local shards
        refresh, plan = False, None
        if on_device:  # capturable: the kernels refresh when the device says (the host cannot know)
            plan = RefreshPlan(states, group["isolation_ratio"], True, True, record.kept_histograms("device"),
                               record.schedule.device_step(group, states, skip), group["scope"])
            record.forget_masks(params)
        else:
            refresh, collect = record.schedule.host_step(group, states, params if partitioned else None)
            if backend.refreshes(group, sharded):
                plan = RefreshPlan(states, group["isolation_ratio"], refresh, collect, record.kept_histograms("host"),
                                   scope=group["scope"])
            else:
                record.kept_histograms(None)
                if refresh:
                    self._refresh(record, params, states, tensors.scores, backend, sharded, hyper)
        if refresh:
            record.forget_masks(params)
        if backend.wants_isolated_indices:
            tensors = tensors._replace(isolated=[self._isolated_index(record, p, st) for p, st in zip(params, states)])
        epi_adamw(tensors, hyper, backend=backend.name, plan=plan)

    def _refresh(self, record: GroupRecord, params: list[Tensor], states: list[dict], scores: list[Tensor],
                 backend: backends.Backend, sharded: bool, hyper: StepHyper) -> None:
        """New masks of a group's stepped `params` with the reference engine. A scope="global" group
        that ZeRO 3 splits into sub-groups (a step() call each) selects over all of its sub-groups
        at the first call of a refresh step, from their start-of-step scores, and not again in
        that step (the later calls step with the masks stored)."""
        group = record.group
        pooled = self._layouts.pooled(group, params)
        if pooled is not None:
            if record.pooled_refresh is record.schedule.engine_step:
                return
            record.pooled_refresh = record.schedule.engine_step
            params, states = pooled, [self._state_of(f, group) for f in pooled]
            scores = [hyper.scores_of(st) for st in states]
            record.forget_masks(pooled)
        self._layouts.refresh_masks(group, params, states, scores, backend.refresh_ops, sharded)

    @staticmethod
    def _isolated_index(record: GroupRecord, p: Tensor, st: dict) -> Tensor:
        index = record.isolated.get(p)
        if index is None:
            index = record.isolated[p] = isolated_indices(st["isolation_mask"], local(p).numel())
        return index

    # ------------------------------------------------------------------ introspection

    def isolation_mask(self, p: Tensor, gather: bool = False) -> Tensor:
        """Bool tensor shaped like `p`: the elements isolated in the most recent step (and until the
        next refresh). All False before the first refresh.

        Sharded `p`: this rank's part, shaped like the local shard (FSDP2), or 1-D over the elements
        of `p` (in its flat order) that this rank's flat partition holds (DeepSpeed ZeRO; empty if
        none). `gather=True`: the whole tensor's mask, shaped like the whole `p`, on every rank (a
        collective over the shard group: every rank of it must call it). A model parameter that a
        wrapper replaced by a copy (fp32 master weights): the copy's mask."""
        return self._layouts.mask(p, self._group_records(), self.state, gather)

    def request_refresh(self) -> None:
        """Make the next step of every param group a refresh step, whatever the schedule says (for
        stage boundaries: protect what mattered for the stage that just ended). The regular
        schedule continues unchanged; with `static=True` the schedule's one refresh still comes."""
        for record in self._group_records():
            record.schedule.request(record.group)

    @torch.no_grad()
    def set_isolation_mask(self, p: Tensor, mask: Tensor) -> None:
        """Put your own mask in force for `p` (bool, shaped like `p`) until its next refresh, e.g.
        a random control mask or one computed elsewhere; `static=True` with a `warmup_steps`
        beyond the run keeps it for good. Creates `p`'s state if it has none yet. Under DeepSpeed
        ZeRO (after the first step), every rank passes the whole mask and keeps its own part."""
        self._layouts.set_mask(p, mask, self._group_records(), self._state_of)

    def isolation_stats(self) -> list[dict[str, Any]]:
        """Per tensor, as of its last refresh: k, selected count, threshold, overlap with the
        previous mask (Jaccard), whether the exact path set the threshold, and the refresh step.
        Under DeepSpeed ZeRO: one entry per model parameter, with whole-tensor figures (the same on
        every rank)."""
        return self._layouts.stats(self._group_records(), self.state)

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, except that the saved groups' settings (as step() checks them) and the EPI
        entries (shapes, dtypes) are validated before anything loads, and EPI entries keep their
        saved dtypes.

        User load hooks see the full state: EPI entries are protected after the last pre-hook and
        restored before the first post-hook.
        """
        records = list(self._records.values())  # (every group's, also of groups a wrapper has set aside)
        pre = [self.register_load_state_dict_pre_hook(lambda opt, sd: check_loaded_groups(opt.defaults, sd)),
               self.register_load_state_dict_pre_hook(
                   lambda opt, sd: protect_epi_entries(sd, opt.param_groups, lambda p: is_given(p, records)))]
        post = self.register_load_state_dict_post_hook(restore_epi_entries, prepend=True)
        try:
            super().load_state_dict(state_dict)  # (its __setstate__ drops the runtime records of the old state)
        finally:
            for hook in pre:
                hook.remove()
            post.remove()
