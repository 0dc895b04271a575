"""Packed isolation masks: bit layout (checked by hand), round trips and the Jaccard overlap."""
import pytest
import torch

from epi_kernels.mask import jaccard_counts, pack_mask, packed_numel, popcount, unpack_mask


def test_bit_layout_is_lsb_first_by_hand():
    m = torch.zeros(11, dtype=torch.bool)
    m[[0, 3, 8, 10]] = True
    assert pack_mask(m).tolist() == [0b00001001, 0b00000101] + [0] * 6  # padded to a 64-bit word
    assert pack_mask(m).view(torch.int64).item() == 1 + 8 + 256 + 1024  # the same bits, as one word


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (64,), (65,), (3, 5, 7), (1023,)])
def test_round_trip(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(shape, generator=g) < 0.3
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(m.numel())
    assert packed.numel() == 8 * -(-m.numel() // 64)
    assert torch.equal(unpack_mask(packed, m.numel()), m.reshape(-1))


def test_non_contiguous_masks_pack_in_logical_order():
    m = torch.tensor([[True, False], [False, False], [True, True]]).t()  # logical: T F T / F F T
    assert unpack_mask(pack_mask(m), 6).tolist() == [True, False, True, False, False, True]


def test_pack_matches_a_plain_loop_on_random_masks():
    m = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.5
    want = [sum(int(m[i]) << (i % 8) for i in range(j, min(j + 8, 1000))) for j in range(0, 1000, 8)]
    assert pack_mask(m).tolist()[: len(want)] == want


def jaccard(a, b):
    """|a & b| / |a | b| of two packed masks (the overlap a refresh records)."""
    return jaccard_counts(popcount(a & b), popcount(a), popcount(b))


def test_popcount_and_jaccard():
    def packed(bits):
        return pack_mask(torch.tensor(bits))

    a, b = packed([True, True, False, False]), packed([False, True, True, False])
    assert popcount(a).item() == 2
    assert popcount(pack_mask(torch.ones(200, dtype=torch.bool))).item() == 200
    assert jaccard(a, b).item() == pytest.approx(1 / 3)
    assert jaccard(a, a).item() == 1.0
    none = packed([False] * 4)
    assert jaccard(none, none).item() == 1.0  # two empty masks are the same set
    assert jaccard(a, none).item() == 0.0
