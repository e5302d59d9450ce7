"""CPU kernel for the "lut" format: table values as int8, torch's int8 matmul per group.

Gathering lut[codes] on every call costs about 8 ms for a 576x1536 layer on one core (torch's
indexing is not vectorised), 35x a dense matmul. Instead the table values are rounded once to
int8 (round(127·lut/max|lut|): an error of at most 1/254 of the group's largest weight,
the order of bf16's own rounding) and the layer becomes an 8-bit symmetric "int" layer with
scales·max|lut|/127, run by the per-group int8 kernel of kernels/cpu.py. Resident cost: one
byte per weight, as unpacked uint8 codes would be. bench: python bench/nupes_table.py --kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.lut import lut_parts
from quantkit.formats.packed import PackedLinear
from quantkit.formats.packing import pack
from quantkit.kernels import cpu


def supports(p: PackedLinear) -> bool:
    return p.format == "lut"


def as_int8(p: PackedLinear) -> PackedLinear:
    """The "int" 8-bit layer whose dequantize() equals p's up to the table's int8 rounding."""
    codes, lut, scales, _ = lut_parts(p)
    top = float(lut.abs().max().clamp(min=1e-30))
    q = torch.round(lut * (127 / top)).to(torch.int32)[codes.long()] + 128   # in [1, 255]
    # fp32 scales (not make_int's fp16): scale/127 of a small group would be fp16-subnormal
    tensors = {"qweight": pack(q, 8), "scales": scales * (top / 127)}
    if "g_idx" in p.tensors:
        tensors["g_idx"] = p.tensors["g_idx"]
    return PackedLinear("int", p.shape, tensors, {"bits": 8, "group_size": p.meta["group_size"], "sym": True})


def prepare(p: PackedLinear, bias: Tensor | None):
    """forward(x) ≈ x @ p.dequantize()ᵀ + bias with bf16 activations (int8 weights, per group)."""
    return cpu.prepare_int8(as_int8(p), bias)
