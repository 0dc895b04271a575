"""FSDP2 (``fully_shard``, also HSDP) parameters are DTensors sharded over a process group.
EPIAdamW steps each rank's local shard (the step is elementwise) and computes each tensor's top-k
threshold for the whole tensor: the integer histograms of the shards are summed over the group
(all_reduce), so every rank reaches the same threshold the unsharded tensor would have. Local
shards keep their own scores and packed masks (over their local elements)."""
from __future__ import annotations

import torch
from torch import Tensor

from .refresh import Shard

__all__ = ["gather_shards", "is_sharded", "local", "reducer", "shard_of"]


_DTENSOR: list = []  # the DTensor class (None without torch.distributed), looked up on first use


def _dtensor():
    # called for every tensor of every step, also inside torch.compile (which traces through
    # functools.lru_cache wrappers with a warning), so memoised by hand; imported lazily (~1 s)
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor  # noqa: PLC0415 - absent on some builds
        except ImportError:
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_sharded(t) -> bool:
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (a view sharing its storage), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def gather_shards(mask: Tensor, p: Tensor) -> Tensor:
    """The whole tensor's mask from the local shards' masks of DTensor `p` (a collective)."""
    cls = _dtensor()
    whole = cls.from_local(mask.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return whole.full_tensor().bool()


_REDUCERS: dict = {}  # process group -> its reduce function (one per group: shards batch by it)


def reducer(group):
    """The function that sums integer counts over process group `group` (one per group)."""
    import torch.distributed as dist  # noqa: PLC0415

    if group not in _REDUCERS:
        comm_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"  # NCCL reduces CUDA tensors only

        def reduce(counts: Tensor) -> Tensor:
            summed = counts.to(comm_device, copy=True)
            dist.all_reduce(summed, group=group)
            return summed.to(counts.device)

        _REDUCERS[group] = reduce
    return _REDUCERS[group]


def shard_of(p: Tensor) -> Shard | None:
    """How to reduce `p`'s counts over its shard group; None for an ordinary tensor or one whose
    local tensor is whole (replicated on every mesh dimension).

    FSDP2 shards over a 1-D mesh; HSDP (a 2-D mesh, replicate x shard) shards over one dimension and
    keeps identical replicas over the other, so the counts are summed over the shard dimension's
    group only (the replicas reach the same thresholds from the same gradients)."""
    if not is_sharded(p):
        return None
    dims = [i for i, placement in enumerate(p.placements) if placement.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("EPIAdamW supports DTensor parameters sharded over one mesh dimension "
                                  f"(fully_shard, HSDP), not {p.placements}")
    # the tie rule takes tied keys in shard order, then flat order within a shard: the tensor's
    # flat order for FSDP2's default Shard(0) (contiguous blocks of rows, in mesh order)
    mesh = p.device_mesh
    return Shard(p.numel(), reducer(mesh.get_group(dims[0])), mesh.get_local_rank(dims[0]), mesh.size(dims[0]))
