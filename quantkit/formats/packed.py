"""PackedLinear: the unit of storage. `dequantize()` is the oracle every kernel must match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from quantkit.formats.packing import pack, unpack

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
    tensors = {"qweight": pack(codes, bits), "scales": scales.to(torch.float16).contiguous()}
    if zeros is not None:
        tensors["qzeros"] = pack(zeros.to(torch.int64), bits)
    if g_idx is not None and not torch.equal(g_idx.int(), group_index(in_f, group_size, g_idx.device)):
        tensors["g_idx"] = g_idx.to(torch.int32).contiguous()
    meta = {"bits": bits, "group_size": group_size, "sym": zeros is None}
    return PackedLinear("int", (out_f, in_f), tensors, meta)


def int_parts(p: PackedLinear) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpacked (codes [out,in], scales fp32 [out,G], zeros fp32 [out,G], g_idx [in])."""
    bits, in_f = p.meta["bits"], p.shape[1]
    codes = unpack(p.tensors["qweight"], bits, in_f)
    scales = p.tensors["scales"].float()
    if "qzeros" in p.tensors:
        zeros = unpack(p.tensors["qzeros"], bits, scales.shape[1]).float()
    else:
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    g_idx = p.tensors.get("g_idx")
    if g_idx is None:
        g_idx = group_index(in_f, p.meta["group_size"], codes.device)
    return codes, scales, zeros, g_idx.long()


@register_format("int")
def _dequantize_int(p: PackedLinear) -> Tensor:
    codes, scales, zeros, g_idx = int_parts(p)
    return (codes.float() - zeros[:, g_idx]) * scales[:, g_idx]
