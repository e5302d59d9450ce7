"""PackedLinear: the unit of storage. `dequantize()` is the oracle every kernel must match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from quantkit.formats.packing import pack, radix_pack, radix_unpack, radix_words, unpack, words_per_row

Dequantizer = Callable[["PackedLinear"], Tensor]
FORMATS: dict[str, Dequantizer] = {}


def register_format(name: str):
    """Register the dequantize function (the reference semantics) of a storage format."""
    def deco(fn: Dequantizer) -> Dequantizer:
        FORMATS[name] = fn
        return fn
    return deco


@dataclass(frozen=True)
class PackedLinear:
    """A compressed weight of shape (out, in) in a named format."""
    format: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def dequantize(self) -> Tensor:
        """The fp32 weight [out, in] this record stands for."""
        return FORMATS[self.format](self)

    def storage_bits(self) -> int:
        """Bits actually stored for the weight (codes + scales + zeros + g_idx)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])


def group_index(in_features: int, group_size: int, device=None) -> Tensor:
    """Group of each input column for contiguous groups; the last group may be shorter."""
    cols = torch.arange(in_features, device=device, dtype=torch.int32)
    return torch.zeros_like(cols) if group_size <= 0 else cols // group_size


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (-1 means one group per row)."""
    return 1 if group_size <= 0 else -(-in_features // group_size)


def make_int(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
             group_size: int, g_idx: Tensor | None = None) -> PackedLinear:
    """Pack affine integer codes: W = (q - zero[g]) * scale[g], g = g_idx[col].

    `zeros` is None for symmetric quantization (zero fixed at 2**(bits-1)); `g_idx` is
    stored only when it differs from contiguous groups (act-order without static groups).
    """
    out_f, in_f = codes.shape
    tensors = {"qweight": pack(codes, bits), **_grid_tensors(in_f, scales, zeros, bits, group_size, g_idx)}
    meta = {"bits": bits, "group_size": group_size, "sym": zeros is None}
    return PackedLinear("int", (out_f, in_f), tensors, meta)


def int_storage_bits(out_f: int, in_f: int, bits: int, group_size: int, sym: bool) -> int:
    """Bits make_int stores for an [out_f, in_f] layer with contiguous groups (no g_idx)."""
    g = n_groups(in_f, group_size)
    words = words_per_row(in_f, bits) + (0 if sym else words_per_row(g, bits))
    return out_f * (32 * words + 16 * g)


def _grid_tensors(in_f: int, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                  g_idx: Tensor | None) -> dict[str, Tensor]:
    tensors = {"scales": scales.to(torch.float16).contiguous()}
    if zeros is not None:
        tensors["qzeros"] = pack(zeros.to(torch.int64), bits)
    return {**tensors, **g_idx_tensor(in_f, group_size, g_idx)}


def g_idx_tensor(in_f: int, group_size: int, g_idx: Tensor | None) -> dict[str, Tensor]:
    """{"g_idx": ...} when the column -> group map differs from contiguous groups, else {}."""
    if g_idx is None or torch.equal(g_idx.int(), group_index(in_f, group_size, g_idx.device)):
        return {}
    return {"g_idx": g_idx.to(torch.int32).contiguous()}


def group_map(p: PackedLinear, device=None) -> Tensor:
    """The column -> group map of a grouped record: the stored g_idx or contiguous groups (long)."""
    g_idx = p.tensors.get("g_idx")
    if g_idx is None:
        g_idx = group_index(p.shape[1], p.meta["group_size"], device)
    return g_idx.long()


def grid_parts(p: PackedLinear) -> tuple[Tensor, Tensor, Tensor]:
    """Scales fp32 [out,G], zeros fp32 [out,G] and g_idx [in] of an affine group grid."""
    bits = p.meta["bits"]
    scales = p.tensors["scales"].float()
    if "qzeros" in p.tensors:
        zeros = unpack(p.tensors["qzeros"], bits, scales.shape[1]).float()
    else:
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    return scales, zeros, group_map(p, scales.device)


def int_parts(p: PackedLinear) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpacked (codes [out,in], scales fp32 [out,G], zeros fp32 [out,G], g_idx [in])."""
    return (unpack(p.tensors["qweight"], p.meta["bits"], p.shape[1]), *grid_parts(p))


@register_format("int")
def _dequantize_int(p: PackedLinear) -> Tensor:
    codes, scales, zeros, g_idx = int_parts(p)
    return (codes.float() - zeros[:, g_idx]) * scales[:, g_idx]


def make_levels(codes: Tensor, levels: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                group_size: int, g_idx: Tensor | None = None) -> PackedLinear:
    """BAQ's per-column level counts on an affine group grid fitted at `bits`.

    Column j holds levels[j] values w = (q·r_j - zero[g])·scale[g], r_j = (2^bits-1)/(levels[j]-1),
    radix-packed column by column (levels[j] = 1: nothing stored, the column is 0).
    Stored: codes, levels - 1 (uint8), and scales/zeros/g_idx as the "int" format stores them.
    """
    out_f, in_f = codes.shape
    tensors = _grid_tensors(in_f, scales, zeros, bits, group_size, g_idx)
    cols = codes.t()
    parts = [radix_pack(cols[j:j + 1], int(m)).reshape(-1) for j, m in enumerate(levels.tolist())]
    tensors["qweight"] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    tensors["levels"] = (levels - 1).to(torch.uint8)
    meta = {"bits": bits, "group_size": group_size, "sym": zeros is None}
    return PackedLinear("int-levels", (out_f, in_f), tensors, meta)


def levels_storage_bits(out_features: int, levels: list[int]) -> int:
    """Bits of the packed codes of a column-level allocation (what make_levels stores)."""
    return 32 * sum(radix_words(out_features, m) for m in levels)


@register_format("int-levels")
def _dequantize_levels(p: PackedLinear) -> Tensor:
    out_f, in_f = p.shape
    levels = p.tensors["levels"].long() + 1
    q = torch.zeros(out_f, in_f, dtype=torch.float32, device=levels.device)
    words = p.tensors["qweight"]
    pos = 0
    for j, m in enumerate(levels.tolist()):
        nw = radix_words(out_f, m)
        q[:, j] = radix_unpack(words[pos:pos + nw][None], m, out_f)[0].float()
        pos += nw
    scales, zeros, g_idx = grid_parts(p)
    maxq = (1 << p.meta["bits"]) - 1
    ratio = torch.where(levels > 1, maxq / (levels - 1).clamp(min=1).float(), 0.0)
    W = (q * ratio - zeros[:, g_idx]) * scales[:, g_idx]
    return torch.where(levels > 1, W, torch.zeros_like(W))
