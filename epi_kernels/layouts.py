"""What an optimizer's param groups hold, and the masks of what they hold: whole tensors, FSDP2
shards (:mod:`epi_kernels.sharding`), DeepSpeed ZeRO flat partitions holding pieces of many model
parameters (:mod:`epi_kernels.partitions`), or same-shaped copies a wrapper stepped in place of a
parameter (fp32 master weights). :class:`Layouts` finds what a wrapper put in a group's place
(:meth:`Layouts.check`, at a step) and reads and writes any model parameter's mask whatever holds
it (:meth:`Layouts.mask`, :meth:`Layouts.set_mask`, :meth:`Layouts.stats`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .group_record import GroupRecord
from .mask import pack_mask, unpack_mask
from .partitions import (Partition, Piece, find_partition, full_shape, gather_pieces, piece_bits, put_piece_bits,
                         refresh_partitions)
from .refresh import RefreshOps, refresh_masks, selection_shard
from .sharding import gather_shards, is_sharded, local, shard_of

__all__ = ["Layouts", "is_given"]


def is_given(p: Tensor, records: Sequence[GroupRecord]) -> bool:
    """Whether `p` is a tensor some group was given (not one a wrapper put in its place)."""
    return not records or any(id(p) in r.given_ids for r in records)


class Layouts:
    """One optimizer's record of what wrappers put in its groups' place, found by `check`: flat
    partitions (with their layouts), the pieces of model parameters they hold, same-shaped copies."""

    def __init__(self) -> None:
        self.partitions: dict[Tensor, tuple[GroupRecord, Partition]] = {}  # flat partition -> (its group, layout)
        self.pieces: dict[Tensor, tuple[Tensor, int]] = {}  # model parameter -> (its flat partition, piece index)
        self.copies: dict[Tensor, Tensor] = {}  # model parameter -> the same-shaped copy stepped in its place

    def forget(self) -> None:
        """Drop what `check` found (a loaded state): the next step finds it again."""
        self.partitions, self.pieces, self.copies = {}, {}, {}

    def piece(self, p: Tensor) -> tuple[Tensor, int, Piece]:
        """(flat partition, index, piece) of model parameter `p` (in `pieces`)."""
        flat, j = self.pieces[p]
        return flat, j, self.partitions[flat][1].pieces[j]

    def check(self, record: GroupRecord, where: str, state: dict, optimizer) -> None:
        """Find the layout of every tensor in `record`'s group that it was not given (and of the
        other sub-groups of a ZeRO 3 partition's param group). RuntimeError if it is none of the
        known ones (a top-k over a flat slice would be wrong) or `state` holds per-tensor entries
        of another layout. Runs again when the group's list of parameters is another list object
        or another length."""
        params = record.group["params"]
        checked = record.layout_checked
        if checked is not None and checked[0] is params and checked[1] == len(params):
            return
        owned, known = record.given, record.given_ids
        for i, p in enumerate(params):
            if id(p) in known:
                continue
            part = self.partitions[p][1] if p in self.partitions else find_partition(p, owned, optimizer)
            if part is None and len(params) == len(owned) and p.shape == owned[i].shape and p.dim():
                known.add(id(p))  # a copy of the parameter it replaces (fp32 master weights): a whole tensor
                self.copies[owned[i]] = p
                continue
            if part is None:
                raise RuntimeError(f"EPIAdamW: {where} holds a tensor of shape {tuple(p.shape)} it was not given "
                                   "(a wrapper replaced its parameters, e.g. with a flattened partition) and no "
                                   "layout of it is known: per-tensor isolation would select over a slice of "
                                   "several parameters. Supported wrappers: DeepSpeed ZeRO stages 1-3 (README). "
                                   "To add parameters yourself, use add_param_group")
            # a sub-group's siblings too: a scope="global" refresh selects over all of them (pooled)
            found = [(p, part)] + [(f, self.partitions[f][1] if f in self.partitions else
                                    find_partition(f, owned, optimizer)) for f in part.siblings if f is not p]
            for flat, layout in found:
                if layout is None:  # (cannot happen with DeepSpeed's own bookkeeping)
                    raise RuntimeError(f"EPIAdamW under DeepSpeed ZeRO 3 ({where}): the layout of another "
                                       "sub-group of the param group cannot be read")
                st = state.get(flat, {})
                if "threshold_bits" in st and tuple(st["threshold_bits"].shape) != (len(layout.pieces),):
                    raise RuntimeError(f"EPIAdamW: {where} holds a flat partition of {len(layout.pieces)} parameters, "
                                       "but its state has per-tensor entries of shape "
                                       f"{tuple(st['threshold_bits'].shape)} (saved with another layout?)")
            for flat, layout in found:
                self.partitions[flat] = (record, layout)
                for j, piece in enumerate(layout.pieces):
                    self.pieces[piece.param] = (flat, j)
        record.layout_checked = (params, len(params))  # (the list itself: its id cannot be reused)

    def pooled(self, group: dict, params: Sequence[Tensor]) -> list[Tensor] | None:
        """The flat partitions a scope="global" refresh of `params` (a group's stepped tensors) selects
        over when ZeRO 3 splits the group into sub-groups, each stepped by a call of its own: all of
        the group's, in sub-group order. None when the group is not split so (or not global)."""
        if group["scope"] != "global" or not self.partitions:
            return None
        # (ZeRO 3 puts one sub-group's flat partition, alone, in the group for each call)
        split = next((self.partitions[p][1] for p in params if p in self.partitions
                      and self.partitions[p][1].siblings), None)
        return None if split is None else list(split.siblings)

    def check_selection(self, group: dict, params: Sequence[Tensor], where: str) -> None:
        """ValueError if scope="global" cannot select over `params` (a group's stepped tensors) as one:
        its whole tensors must all be shards of one process group, or none (refresh.selection_shard)."""
        if group["scope"] == "global":
            selection_shard([shard_of(p) for p in params if p not in self.partitions], where)

    @torch.compiler.disable  # integer threshold engine with host reads: one graph break, not dozens
    def refresh_masks(self, group: dict, params: Sequence[Tensor], states: Sequence[dict], scores: Sequence[Tensor],
                      ops: RefreshOps, sharded: bool) -> None:
        """New masks of `params` (a group's stepped tensors) from their `scores` with the reference
        engine (refresh.refresh_masks): whole tensors and FSDP2 shards as one batch, the flat
        partitions' pieces as another (partitions.refresh_partitions)."""
        settings = dict(isolation_ratio=group["isolation_ratio"], scope=group["scope"], threshold=group["threshold"],
                        ops=ops)
        whole = [i for i, p in enumerate(params) if p not in self.partitions]
        if whole:
            refresh_masks([states[i] for i in whole], scores=[scores[i] for i in whole],
                          shards=[shard_of(params[i]) for i in whole] if sharded else None, **settings)
        flat = [(st, s, self.partitions[p][1]) for p, st, s in zip(params, states, scores) if p in self.partitions]
        if flat:
            refresh_partitions(flat, **settings)

    # ------------------------------------------------------------------ masks of model parameters

    def _owner(self, p: object, records: Sequence[GroupRecord], what: str) -> tuple[Tensor, GroupRecord | None]:
        """(what holds model parameter `p`, the record of its group): `p` itself or the copy a wrapper
        steps in its place; the record None for a piece of a flat partition, or for a parameter a
        wrapper replaced by a tensor not mapped yet (the first step maps it: `p` is then not in
        `pieces`). TypeError/ValueError naming `what` (the method) if `p` is not a parameter of
        this optimizer."""
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}: p must be a parameter (a tensor) of this optimizer, got {type(p).__name__}")
        p = self.copies.get(p, p)
        record = next((r for r in records if any(q is p for q in r.group["params"])), None)
        if record is None and p not in self.pieces and not any(id(p) in r.given_ids for r in records):
            raise ValueError(f"{what}: p is not a parameter of this optimizer")
        return p, record

    def mask(self, p: Tensor, records: Sequence[GroupRecord], state: dict, gather: bool) -> Tensor:
        """The mask of model parameter `p` in force (EPIAdamW.isolation_mask)."""
        p, record = self._owner(p, records, "isolation_mask")
        if record is None and p not in self.pieces:  # replaced by a wrapper, not mapped yet: nothing isolated
            return torch.zeros(full_shape(p), dtype=torch.bool, device=p.device)
        if p in self.pieces:
            flat, _, piece = self.piece(p)
            bits = piece_bits(state[flat]["isolation_mask"], piece.start, piece.numel) \
                if "isolation_mask" in state.get(flat, {}) else torch.zeros(piece.numel, dtype=torch.bool)
            return gather_pieces(bits, piece) if gather else bits
        st, shard = state.get(p, {}), local(p)  # FSDP2: the mask of this rank's shard
        if "isolation_mask" not in st:
            mask = torch.zeros(shard.shape, dtype=torch.bool, device=shard.device)
        else:
            mask = unpack_mask(st["isolation_mask"], shard.numel()).view(shard.shape)
        return gather_shards(mask, p) if gather and is_sharded(p) else mask

    def set_mask(self, p: Tensor, mask: Tensor, records: Sequence[GroupRecord],
                 state_of: Callable[[Tensor, dict], dict]) -> None:
        """Put `mask` in force for model parameter `p` (EPIAdamW.set_isolation_mask); `state_of(t,
        group)` is tensor t's optimizer state, created if it has none."""
        p, record = self._owner(p, records, "set_isolation_mask")
        if record is None and p not in self.pieces:
            raise ValueError("set_isolation_mask: a wrapper (DeepSpeed ZeRO) put another tensor in p's place; its "
                             "layout is known from the first step on")
        if not (torch.is_tensor(mask) and mask.dtype == torch.bool and tuple(mask.shape) == full_shape(p)
                and mask.layout == torch.strided and not mask.is_meta):
            got = (f"{mask.dtype} {tuple(mask.shape)} ({mask.layout}{', meta device' if mask.is_meta else ''})"
                   if torch.is_tensor(mask) else type(mask).__name__)
            raise ValueError(f"set_isolation_mask: mask must be a dense bool tensor of shape {full_shape(p)}, got {got}")
        if record is None:  # a model parameter of a flat partition: this rank's piece of the mask
            flat, j, piece = self.piece(p)
            record = self.partitions[flat][0]
            st = state_of(flat, record.group)
            put_piece_bits(st["isolation_mask"], piece.start,
                           mask.reshape(-1)[piece.offset:piece.offset + piece.numel].to(flat.device))
            st["isolated_count"][j].fill_(int(mask.sum()))
            record.forget_masks([flat])
            return
        st = state_of(p, record.group)
        st["isolation_mask"].copy_(pack_mask(mask.to(p.device)))
        st["isolated_count"].fill_(int(mask.sum()))
        record.forget_masks([p])

    def stats(self, records: Sequence[GroupRecord], state: dict) -> list[dict[str, Any]]:
        """Per tensor, as of its last refresh (EPIAdamW.isolation_stats): one entry per model
        parameter, with whole-tensor figures, whatever holds it."""
        stats = []
        for gi, record in enumerate(records):
            group = record.group
            names = group.get("param_names")
            # (tensor, its state, which entry of the state's per-tensor entries, index in the group)
            entries = [(p, state.get(p, {}), (), pi) for pi, p in enumerate(group["params"])
                       if p not in self.partitions]
            index = {id(q): qi for qi, q in enumerate(record.given)}
            entries += [(pc.param, state.get(flat, {}), (j,), index.get(id(pc.param)))
                        for flat, (owner, part) in self.partitions.items() if owner is record
                        for j, pc in enumerate(part.pieces)]
            for p, st, at, pi in entries:
                if "isolation_mask" not in st:
                    continue
                tau = int(st["threshold_bits"][at])
                stats.append({
                    "group": gi, "index": pi, "name": names[pi] if names and pi is not None else None,
                    "shape": full_shape(p), "numel": math.prod(full_shape(p)), "scope": group["scope"],
                    "k": int(st["isolation_k"][at]), "selected": int(st["isolated_count"][at]),
                    "threshold": torch.tensor(tau, dtype=torch.int32).view(torch.float32).item(),
                    "threshold_bits": tau, "overlap": float(st["isolation_overlap"][at]),
                    "exact": bool(st["threshold_exact"][at]), "refresh_step": int(st["refresh_step"][at]),
                })
        return stats
