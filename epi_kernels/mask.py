"""Bit-packed isolation masks: 1 bit per element, element i in bit (i % 8) of byte i // 8.

The bit order is least-significant first and the buffer is padded with zero bits to a whole number
of 64-bit words, so on a little-endian machine the same bytes read as 32- or 64-bit words have
element i in bit (i % 32) of word i // 32, or bit (i % 64) of word i // 64: kernels load whichever
width suits them (the compiled CPU step broadcasts one int64 word over 64 elements).
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
    """Bytes holding `numel` mask bits: 8 per started group of 64 elements."""
    return 8 * ((numel + 63) // 64)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor (any shape, logical order) into uint8 [packed_numel(numel)]."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 64
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
