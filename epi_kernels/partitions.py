"""Flat partitions (DeepSpeed ZeRO 1, 2 and 3): one flat tensor in a param group holding this rank's
pieces of many model parameters. EPIAdamW steps the flat tensor as one (the step is elementwise)
and refreshes its mask piece by piece: each piece is a shard of its model parameter (refresh.Shard),
so its integer counts are summed over the data-parallel group and every rank applies the whole
parameter's threshold, as for FSDP2 shards (DESIGN.md, "Sharded parameters").

The layout is read from DeepSpeed's own bookkeeping, without importing DeepSpeed:
- ZeRO 1 and 2 (and the bf16 optimizer) link each model parameter to its fragment of the flat fp32
  partition: ``p._hp_mapping`` (None where this rank holds none of it) with the fragment's offset in
  the partition and in the parameter, and ``p._dp_group``;
- ZeRO 3 partitions each parameter on its own (``ds_tensor``: elements [r * n, (r + 1) * n) of the
  parameter on rank r, n = ``partition_numel()``) and flattens the partitions of a sub-group,
  in order, into ``_z3_optimizer.fp32_partitioned_groups_flat[i]``.

State of a flat partition: the elementwise entries (exp_avg, exp_avg_sq, importance) and the packed
mask are shaped by the flat tensor (bit i = flat element i; DeepSpeed's per-parameter state views
map the elementwise ones back); the per-tensor entries (threshold, k, counts, refresh step) are
vectors with one element per model parameter of the partition, whole-tensor values that every rank
holds alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .mask import pack_mask, unpack_mask
from .refresh import RefreshOps, Shard, refresh_masks
from .sharding import reducer
from .state import SCALAR_ENTRIES

__all__ = ["Piece", "Partition", "find_partition", "full_shape", "gather_pieces", "piece_bits", "put_piece_bits",
           "refresh_partitions"]


@dataclass(frozen=True)
class Piece:
    """One model parameter's part of a flat partition: flat elements [start, start + numel) are
    elements [offset, offset + numel) of `param` in its flat order (numel 0: none here)."""
    param: Tensor
    start: int
    numel: int
    offset: int
    shard: Shard  # the whole parameter's numel and how to sum counts over its group


@dataclass(frozen=True)
class Partition:
    """The pieces of a flat partition, one per model parameter the partition's layout covers (the
    same parameters, in the same order, on every rank of the group). `siblings`: when ZeRO 3 splits
    the param group into several sub-groups (each stepped by a step() call of its own), the flat
    partitions of all of them in sub-group order, this one included; else empty."""
    pieces: tuple[Piece, ...]
    siblings: tuple[Tensor, ...] = field(default=(), compare=False)


def _rank_and_size(group) -> tuple[int, int]:
    import torch.distributed as dist  # noqa: PLC0415 - only ever reached under DeepSpeed

    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_UNSUPPORTED = (("elastic_checkpoint", "elastic_checkpoint: it re-cuts the flat partitions on load, which would "
                 "scramble the per-parameter isolation state; set \"elastic_checkpoint\": false"),
                ("swap_optimizer", "NVMe offload of the optimizer state: it swaps the state in and out of the "
                 "optimizer's view"),
                ("zenflow", "ZenFlow: it steps the partitions outside the optimizer's step"))


def _refuse_unsupported(wrappers: Sequence) -> None:
    """RuntimeError naming the first ZeRO feature in use (an attribute of a wrapper) that
    per-parameter isolation cannot follow."""
    for w in wrappers:
        for attr, why in _UNSUPPORTED:
            if getattr(w, attr, False):
                raise RuntimeError(f"EPIAdamW under DeepSpeed ZeRO does not support {why}")


def _stepping_wrappers(optimizer) -> list:
    """The objects stepping `optimizer` right now: DeepSpeed's ZeRO 1/2 wrapper calls its step()
    from its own step(), as `self.optimizer.step()`, and leaves no link from the parameters to
    itself, so the callers' frames are read (a few, once per partition found)."""
    import inspect  # noqa: PLC0415

    found, frame = [], inspect.currentframe()
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        if caller is not optimizer and getattr(caller, "optimizer", None) is optimizer:
            found.append(caller)
        frame = frame.f_back
    return found


_CALLER_FRAMES = 32  # how far up the stack a wrapper's step() is looked for


def _zero12(flat: Tensor, params: Sequence[Tensor], optimizer) -> Partition | None:
    """ZeRO 1/2 (and the bf16 optimizer): the group's parameters as DeepSpeed linked them."""
    linked = [p for p in params if hasattr(p, "_dp_group") and hasattr(p, "_hp_mapping")]
    mapped = [p for p in linked if p._hp_mapping is not None]
    # (none mapped: this rank's partition holds only padding; it still takes part in the collectives)
    if not linked or not all(_same_storage(p._hp_mapping.hp_fragment, flat) for p in mapped):
        return None
    _refuse_unsupported(_stepping_wrappers(optimizer))
    pieces = []
    for p in linked:
        rank, size = _rank_and_size(p._dp_group)
        shard = Shard(p.numel(), reducer(p._dp_group), rank, size)
        m = p._hp_mapping
        pieces.append(Piece(p, m.hp_fragment_address.start, m.hp_fragment_address.numel, m.lp_fragment_address.start,
                            shard) if m is not None else Piece(p, 0, 0, 0, shard))
    return Partition(tuple(pieces))


def _zero3(flat: Tensor, params: Sequence[Tensor]) -> Partition | None:
    """ZeRO 3: the sub-group whose flat fp32 partition `flat` is."""
    wrapper = next((p._z3_optimizer for p in params if hasattr(p, "_z3_optimizer")), None)
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", ())
    index = next((i for i, f in enumerate(flats) if f is flat), None)
    if index is None:
        return None
    _refuse_unsupported([wrapper])
    pieces, start = [], 0
    for p in wrapper.fp16_groups[index]:
        rank, size = _rank_and_size(p.ds_process_group)
        n = p.partition_numel()
        offset = rank * n
        pieces.append(Piece(p, start, max(0, min(n, p.ds_numel - offset)), offset,
                            Shard(p.ds_numel, reducer(p.ds_process_group), rank, size)))
        start += n
    groups = getattr(wrapper, "sub_group_to_group_id", {})
    siblings = tuple(flats[i] for i in sorted(groups) if groups[i] == groups.get(index))
    return Partition(tuple(pieces), siblings if len(siblings) > 1 else ())


def full_shape(p: Tensor) -> tuple[int, ...]:
    """The shape of a model parameter: ZeRO 3 keeps it in ds_shape (p itself is empty between uses)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def gather_pieces(bits: Tensor, piece: Piece) -> Tensor:
    """The whole parameter's mask from every rank's piece of it (a collective over its group)."""
    whole = torch.zeros(piece.shard.numel, dtype=torch.uint8, device=bits.device)
    whole[piece.offset:piece.offset + piece.numel] = bits.to(torch.uint8)
    return piece.shard.reduce(whole).bool().view(full_shape(piece.param))


def find_partition(flat: Tensor, params: Sequence[Tensor], optimizer) -> Partition | None:
    """The layout of `flat`, a tensor a wrapper of `optimizer` put in a param group in place of
    `params` (the group's own parameters), or None if no supported wrapper made it."""
    return _zero12(flat, params, optimizer) or _zero3(flat, params)


def piece_bits(packed: Tensor, start: int, numel: int) -> Tensor:
    """Bits [start, start + numel) of a packed mask, as a bool tensor."""
    lo, hi = start // 8, (start + numel + 7) // 8
    return unpack_mask(packed[lo:hi], 8 * (hi - lo))[start - 8 * lo:start - 8 * lo + numel]


def put_piece_bits(packed: Tensor, start: int, bits: Tensor) -> None:
    """Write a bool tensor into bits [start, start + bits.numel()) of a packed mask."""
    lo, hi = start // 8, (start + bits.numel() + 7) // 8
    window = unpack_mask(packed[lo:hi], 8 * (hi - lo)).clone()
    window[start - 8 * lo:start - 8 * lo + bits.numel()] = bits.reshape(-1)
    packed[lo:hi] = pack_mask(window)[:hi - lo]


def _piece_state(state: dict, j: int, piece: Piece) -> dict:
    """A per-tensor state of piece j for refresh.refresh_masks: views of the j-th per-tensor
    entries, and the piece's mask bits in a packed buffer of their own."""
    out = {key: state[key][j] for key in SCALAR_ENTRIES}
    out["isolation_mask"] = pack_mask(piece_bits(state["isolation_mask"], piece.start, piece.numel))
    return out


def refresh_partitions(parts: Sequence[tuple[dict, Tensor, Partition]], *, isolation_ratio: float, scope: str,
                       threshold: str, ops: RefreshOps) -> None:
    """New masks of every piece of flat partitions `parts` ((state, scores, layout) each), each piece
    a shard of its model parameter (scope="tensor": one selection per parameter; "global": one over
    all the pieces' parameters, in order): one collective per phase for all of them."""
    views, shards, scores = [], [], []
    for state, s, part in parts:
        flat = s.reshape(-1)
        for j, pc in enumerate(part.pieces):
            views.append(_piece_state(state, j, pc))
            shards.append(pc.shard)
            scores.append(flat.narrow(0, pc.start, pc.numel))
    refresh_masks(views, isolation_ratio=isolation_ratio, scope=scope, threshold=threshold, ops=ops, shards=shards,
                  scores=scores)
    done = iter(views)
    for state, _, part in parts:
        for pc, view in zip(part.pieces, done):
            if pc.numel:
                put_piece_bits(state["isolation_mask"], pc.start, unpack_mask(view["isolation_mask"], pc.numel))
