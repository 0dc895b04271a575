"""FSDP2 (``fully_shard``) parameters are DTensors sharded over a process group. EPIAdamW steps each
rank's local shard (the step is elementwise) and computes each tensor's top-k threshold for the
whole tensor: the integer histograms of the shards are summed over the group (all_reduce), so
every rank reaches the same threshold the unsharded tensor would have. Local shards keep their
own scores and packed masks (over their local elements)."""
from __future__ import annotations

from torch import Tensor

from .refresh import Shard

__all__ = ["is_sharded", "local", "shard_of"]


def _dtensor():
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415 - absent on some builds
    except ImportError:
        return None
    return DTensor


def is_sharded(t) -> bool:
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (a view sharing its storage), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


_REDUCERS: dict = {}  # process group -> its reduce function (one per group: shards batch by it)


def _reducer(group):
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
    """How to reduce `p`'s counts over its shard group; None for an ordinary tensor."""
    if not is_sharded(p):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("EPIAdamW supports DTensor parameters on a 1-D device mesh (fully_shard) only")
    return Shard(p.numel(), _reducer(mesh.get_group()))
