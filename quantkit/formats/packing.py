"""Bit packing of unsigned integer codes into int32 words along the last dimension.

Values are laid out as one little-endian bit stream per row: value k occupies bits
[k*b, (k+1)*b); a value may straddle two words (3-bit). Rows are padded to whole words.
"""
from __future__ import annotations

import torch
from torch import Tensor


def words_per_row(n: int, bits: int) -> int:
    """Number of int32 words holding n values of `bits` bits."""
    return (n * bits + 31) // 32


def _positions(n: int, bits: int, device) -> tuple[Tensor, Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) of shape [..., n] into int32 words [..., words]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, n = c.shape
    c = c.reshape(-1, n)
    word, off = _positions(n, bits, c.device)
    nwords = words_per_row(n, bits)
    out = torch.zeros(c.shape[0], nwords + 1, dtype=torch.int64, device=c.device)
    shifted = c << off  # fits in 47 bits: spill over into the next word is kept
    out.scatter_add_(1, word.expand_as(c), shifted & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand_as(c), shifted >> 32)
    out = out[:, :nwords]
    # reinterpret the low 32 bits as signed int32
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.reshape(*lead, nwords)


def unpack(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack: int32 words [..., words] -> int32 codes [..., n]."""
    *lead, nwords = words.shape
    if nwords != words_per_row(n, bits):
        raise ValueError(f"{nwords} words cannot hold {n} values of {bits} bits")
    w = words.reshape(-1, nwords).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    word, off = _positions(n, bits, w.device)
    both = w[:, word] | (w[:, word + 1] << 32)
    codes = (both >> off) & ((1 << bits) - 1)
    return codes.to(torch.int32).reshape(*lead, n)


# Radix packing: k codes of a column with m levels share one 32-bit word as Σ q_i m^i, which
# stores log2(m) bits per code up to rounding (3 levels: 20 codes per word, 1.6 bits each).

def codes_per_word(m: int) -> int:
    """Most codes in [0, m) that fit one 32-bit word in base m (0 for m = 1: nothing stored)."""
    if m <= 1:
        return 0
    k = 0
    while m ** (k + 1) <= 1 << 32:
        k += 1
    return k


def radix_words(n: int, m: int) -> int:
    """Words holding n codes with m levels."""
    k = codes_per_word(m)
    return 0 if k == 0 else -(-n // k)


def radix_pack(codes: Tensor, m: int) -> Tensor:
    """Codes [rows, n] in [0, m) -> int32 words [rows, radix_words(n, m)]."""
    k = codes_per_word(m)
    rows, n = codes.shape
    if k == 0:
        return torch.zeros(rows, 0, dtype=torch.int32, device=codes.device)
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= m):
        raise ValueError(f"codes out of range for {m} levels")
    nw = radix_words(n, m)
    c = torch.nn.functional.pad(c, (0, nw * k - n)).reshape(rows, nw, k)
    powers = m ** torch.arange(k, dtype=torch.int64, device=c.device)
    v = (c * powers).sum(-1)
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def radix_unpack(words: Tensor, m: int, n: int) -> Tensor:
    """Inverse of radix_pack: int32 words [rows, words] -> int32 codes [rows, n]."""
    k = codes_per_word(m)
    if k == 0:
        return torch.zeros(words.shape[0], n, dtype=torch.int32, device=words.device)
    if words.shape[1] != radix_words(n, m):
        raise ValueError(f"{words.shape[1]} words cannot hold {n} codes of {m} levels")
    v = words.to(torch.int64) & 0xFFFFFFFF
    powers = m ** torch.arange(k, dtype=torch.int64, device=v.device)
    codes = (v[..., None] // powers) % m
    return codes.reshape(words.shape[0], -1)[:, :n].to(torch.int32)
