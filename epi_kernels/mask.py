"""Bit-packed isolation masks: 1 bit per element, element i in bit (i % 8) of byte i // 8.

The bit order is least-significant first and the buffer is padded with zero bits to a whole number
of 64-bit words, so on a little-endian machine the same bytes read as 32- or 64-bit words have
element i in bit (i % 32) of word i // 32, or bit (i % 64) of word i // 64: kernels load whichever
width suits them (the compiled CPU step broadcasts one int64 word over 64 elements).
Elements are numbered in the tensor's logical (row-major) order.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import threshold as th
from .threshold import score_keys

__all__ = ["packed_numel", "pack_mask", "threshold_mask", "score_mask", "unpack_mask", "isolated_indices", "popcount",
           "jaccard_counts"]

assert sys.byteorder == "little", "packed masks assume a little-endian host"
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
# Eight 0/1 bytes read as one little-endian int64, times this constant, hold in their top byte the
# eight bits in order (byte j -> bit j): each bit lands at 56 + j with no carries between them.
_GATHER_BITS = 0x0102040810204080


def packed_numel(numel: int) -> int:
    """Bytes holding `numel` mask bits: 8 per started group of 64 elements."""
    return 8 * ((numel + 63) // 64)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor (any shape, logical order) into uint8 [packed_numel(numel)]."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 64
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    eight = flat.view(-1, 8).view(torch.uint8).view(torch.int64)  # 8 elements per int64, one byte each
    return ((eight * _GATHER_BITS) >> 56).to(torch.uint8).view(-1)


def threshold_mask(keys: Tensor, tau: int | Tensor, cut: int | None = None) -> Tensor:
    """The packed isolation mask ``keys >= tau`` (pure tensor code; the compiled backend fuses it).
    With a tie cut (threshold.tie_cuts), elements from flat index `cut` on need ``keys > tau``."""
    mask = keys >= tau
    if cut is not None and cut < keys.numel():
        mask[cut:] = keys[cut:] > tau
    return pack_mask(mask)


def score_mask(scores: Tensor, tau: int | Tensor) -> Tensor:
    """:func:`threshold_mask` of the keys of scores."""
    return threshold_mask(score_keys(scores), tau)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of `numel` elements."""
    bits = packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)
    return bits.view(-1)[:numel] != 0


@torch.compiler.disable  # a data-dependent size: traced, it breaks the graph and recompiles as counts change
def isolated_indices(packed_mask: Tensor, numel: int) -> Tensor:
    """Flat (logical-order) int64 indices of the isolated elements of a packed mask, written into
    one tensor of their count, SLICE elements of the mask unpacked at a time: the temporaries take
    about 10 B per element of one slice, not 2 B per element of the tensor (a refresh of the
    torch backend rebuilds these; bench/memory.py)."""
    out = torch.empty(int(popcount(packed_mask)), dtype=torch.int64, device=packed_mask.device)
    filled = 0
    for lo in range(0, numel, th.SLICE):  # SLICE is a multiple of 64: whole bytes of the mask
        n = min(th.SLICE, numel - lo)
        found = unpack_mask(packed_mask[lo // 8:(lo + n + 7) // 8], n).nonzero().squeeze(1)
        out[filled:filled + found.numel()] = found.add_(lo)
        filled += found.numel()
    return out


def popcount(packed: Tensor, also: Tensor | None = None) -> Tensor:
    """Number of set bits in a packed mask (in ``packed & also`` given a second mask of its size),
    as a 0-dim int64 tensor: SWAR bit counting per int64 word, SLICE bytes at a time (its
    temporaries are a few times the size of the words they count)."""
    total = torch.zeros((), dtype=torch.int64, device=packed.device)
    for lo in range(0, packed.numel(), th.SLICE):  # SLICE is a multiple of 8: whole words
        step = slice(lo, lo + th.SLICE)
        words = packed[step] if also is None else packed[step] & also[step]
        x = words.view(torch.int64)
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        total += ((x * 0x0101010101010101) >> 56).sum()  # per word: the byte counts summed in the top byte
    return total


def jaccard_counts(inter: Tensor, count_a: Tensor, count_b: Tensor) -> Tensor:
    """Jaccard index from set sizes (elementwise over tensors of them): float32, 1.0 for two empty sets."""
    union = count_a + count_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).to(torch.float32)
