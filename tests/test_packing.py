import pytest
import torch

from quantkit.formats.packed import group_index, levels_storage_bits, make_int, make_levels, n_groups
from quantkit.formats.packing import (codes_per_word, pack, radix_pack, radix_unpack, radix_words, unpack,
                                     words_per_row)


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


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 11, 16, 17, 100, 255, 256])
@pytest.mark.parametrize("n", [1, 19, 20, 21, 576])
def test_radix_pack_roundtrip_exact(m, n):
    k = codes_per_word(m)
    assert k == 0 if m == 1 else m ** k <= 1 << 32 < m ** (k + 1)
    g = torch.Generator().manual_seed(m * 1000 + n)
    codes = torch.randint(0, m, (4, n), generator=g, dtype=torch.int32)
    words = radix_pack(codes, m)
    assert words.dtype == torch.int32 and words.shape == (4, radix_words(n, m))
    assert torch.equal(radix_unpack(words, m, n), codes)


def test_levels_format_stores_what_it_says():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, bits = 9, 40, 3
    levels = torch.randint(1, 30, (in_f,), generator=g)
    codes = (torch.rand(out_f, in_f, generator=g) * levels).floor().int()
    scales = torch.rand(out_f, 2, generator=g) + 0.5
    zeros = torch.randint(0, 8, (out_f, 2), generator=g).float()
    p = make_levels(codes, levels, scales, zeros, bits, 32)
    assert p.tensors["qweight"].numel() * 32 == levels_storage_bits(out_f, levels.tolist())
    s, z = scales.half().float(), zeros
    gi = torch.arange(in_f) // 32
    r = torch.where(levels > 1, 7 / (levels - 1).clamp(min=1), 0.0)
    want = torch.where(levels > 1, (codes * r - z[:, gi]) * s[:, gi], 0.0)
    assert torch.equal(p.dequantize(), want)
