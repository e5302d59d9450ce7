import pytest
import torch

from quantkit.formats.packed import group_index, make_int, n_groups
from quantkit.formats.packing import pack, unpack, words_per_row


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 576, 1000])
def test_pack_roundtrip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, 7, n), generator=g, dtype=torch.int32)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 7, words_per_row(n, bits))
    assert torch.equal(unpack(words, bits, n), codes)


def test_three_bit_values_straddle_words():
    # value 10 of a 3-bit stream occupies bits 30..32: two bits in word 0, one in word 1
    codes = torch.zeros(1, 11, dtype=torch.int32)
    codes[0, 10] = 0b111
    w = pack(codes, 3)
    assert (int(w[0, 0]) & 0xFFFFFFFF) >> 30 == 0b11 and int(w[0, 1]) == 0b1
    assert torch.equal(unpack(w, 3, 11), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([[8]]), 3)


def test_groups_short_last_group():
    gi = group_index(576, 128)
    assert n_groups(576, 128) == 5 and int(gi[-1]) == 4 and int((gi == 4).sum()) == 64
    assert n_groups(576, -1) == 1 and int(group_index(576, -1).max()) == 0


def test_make_int_dequantize_matches_formula():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (4, 100), generator=g, dtype=torch.int32)
    scales = torch.rand(4, 4, generator=g) + 0.1
    zeros = torch.randint(0, 8, (4, 4), generator=g).float()
    p = make_int(codes, scales, zeros, 3, 32)
    gi = torch.arange(100) // 32
    s = scales.half().float()
    expect = (codes.float() - zeros[:, gi]) * s[:, gi]
    assert torch.equal(p.dequantize(), expect)
    assert "g_idx" not in p.tensors  # contiguous groups are not stored
    # bits per weight = codes + fp16 scales + packed zeros, measured from the stored tensors
    assert p.storage_bits() == 4 * 10 * 32 + 16 * 16 + 4 * 32
