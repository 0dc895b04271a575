"""Bit-packed isolation masks: 1 bit per element, element i in bit (i % 8) of byte i // 8.

The bit order is least-significant first, so on a little-endian machine the same buffer read as
32-bit words has element i in bit (i % 32) of word i // 32: kernels may load either width.
Elements are numbered in the tensor's logical (row-major) order.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["packed_numel", "pack_mask", "unpack_mask", "jaccard"]

_BIT_WEIGHTS = {}


def _weights(device: torch.device) -> Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return w


def packed_numel(numel: int) -> int:
    """Bytes needed for `numel` mask bits."""
    return (numel + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor (any shape, logical order) into uint8 [ceil(numel / 8)]."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of `numel` elements."""
    bits = packed.reshape(-1, 1) & _weights(packed.device)
    return bits.view(-1)[:numel] != 0


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """|a & b| / |a | b| of two bool tensors as a 0-dim float32 tensor; 1.0 when both are empty."""
    union = (a | b).sum()
    inter = (a & b).sum()
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).to(torch.float32)
