"""The "lut" format: packed codes index a per-layer table of values, scaled per group.

W[r, j] = lut[codes[r, j]] * scales[r, g_idx[j]]. The table has 2**bits fp32 entries (one per
layer, so it costs nothing per weight); scales are fp16 [out, G]. NUPES stores its power grid
this way, normalised so that max |lut| = 1: scales then sit near each group's absolute maximum,
far from fp16's subnormal range even for small exponents (whose raw grid |k|^(1/a) is large).
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.packed import (PackedLinear, g_idx_tensor, group_map, n_groups, pack,
                                     register_format)
from quantkit.formats.packing import unpack, words_per_row


def make_lut(codes: Tensor, lut: Tensor, scales: Tensor, bits: int, group_size: int,
             g_idx: Tensor | None = None, **meta) -> PackedLinear:
    """Pack codes [out, in] in [0, 2**bits) with a value table [2**bits] and scales [out, G].

    `scales` must already hold fp16-representable values for a bit-exact round trip; `g_idx`
    is stored only when it differs from contiguous groups; extra `meta` (e.g. the exponent)
    goes to the manifest.
    """
    if lut.numel() != 1 << bits:
        raise ValueError(f"a {bits}-bit lut needs {1 << bits} entries, got {lut.numel()}")
    out_f, in_f = codes.shape
    tensors = {"qweight": pack(codes, bits), "lut": lut.to(torch.float32).contiguous(),
               "scales": scales.to(torch.float16).contiguous()}
    tensors.update(g_idx_tensor(in_f, group_size, g_idx))
    return PackedLinear("lut", (out_f, in_f), tensors,
                        {"bits": bits, "group_size": group_size, **meta})


def lut_storage_bits(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Bits make_lut stores for an [out_f, in_f] layer with contiguous groups (no g_idx)."""
    return out_f * (32 * words_per_row(in_f, bits) + 16 * n_groups(in_f, group_size)) + (32 << bits)


def lut_parts(p: PackedLinear) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpacked (codes int32 [out,in], lut fp32 [2**bits], scales fp32 [out,G], g_idx long [in])."""
    codes = unpack(p.tensors["qweight"], p.meta["bits"], p.shape[1])
    scales = p.tensors["scales"].float()
    return codes, p.tensors["lut"].float(), scales, group_map(p, scales.device)


def lut_dequantize(codes: Tensor, lut: Tensor, scales: Tensor, g_idx: Tensor) -> Tensor:
    """lut[codes] * scales[:, g_idx] in fp32: the one formula that compressors and the oracle share."""
    return lut[codes.long()] * scales[:, g_idx]


@register_format("lut")
def _dequantize_lut(p: PackedLinear) -> Tensor:
    return lut_dequantize(*lut_parts(p))
