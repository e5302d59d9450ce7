"""CPU fast paths: torch's packed int4 (groups) and int8 (per channel) matmuls, bf16 activations.

These ops are fast only with bf16 activations on CPU, so inputs are cast to bf16 and the
result cast back. int4 holds any code width <= 4: the kernel computes (c - 8)·s + m per
group, so an affine code (q - z)·s maps to m = (8 - z)·s.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.formats.packed import PackedLinear, int_parts

_KERNEL_GROUPS = (256, 128, 64, 32)


def _kernel_group(in_f: int, group_size: int) -> int:
    k_pad = -(-in_f // 32) * 32
    k = k_pad if group_size <= 0 or group_size >= in_f else math.gcd(group_size, k_pad)
    return next((g for g in _KERNEL_GROUPS if k % g == 0), 0)


def supports_int4(p: PackedLinear) -> bool:
    return p.format == "int" and p.meta["bits"] <= 4 and _kernel_group(p.shape[1], p.meta["group_size"]) > 0


def prepare_int4(p: PackedLinear, bias: Tensor | None):
    """Repack into torch's int4 CPU layout; pads the input dim to a multiple of 32."""
    codes, scales, zeros, g_idx = int_parts(p)
    out_f, in_f = p.shape
    perm = None
    if "g_idx" in p.tensors:  # act-order groups: sort columns so that groups are contiguous
        perm = torch.argsort(g_idx, stable=True)
        codes, g_idx = codes[:, perm], g_idx[perm]
    k_pad = -(-in_f // 32) * 32
    gk = _kernel_group(in_f, p.meta["group_size"])
    # scale / offset per kernel group: the stored group of each kernel group's first column
    first = torch.arange(0, k_pad, gk).clamp(max=in_f - 1)
    s = scales[:, g_idx[first]]
    if p.meta["bits"] <= 3:
        # c = q - z + 8 stays in [1, 15]: the offset term vanishes, no bf16 cancellation
        codes = codes - zeros[:, g_idx].to(torch.int32) + 8
        m = torch.zeros_like(s)
    else:
        m = (8 - zeros[:, g_idx[first]]) * s
    n_pad = -(-out_f // 16) * 16  # the op needs N divisible by 16: pad rows, slice them off
    s, m = F.pad(s, (0, 0, 0, n_pad - out_f)), F.pad(m, (0, 0, 0, n_pad - out_f))
    sz = torch.stack([s.t(), m.t()], dim=-1).to(torch.bfloat16).contiguous()
    codes = F.pad(codes, (0, k_pad - in_f, 0, n_pad - out_f), value=8)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    b = None if bias is None else bias.to(torch.bfloat16)

    def forward(x: Tensor) -> Tensor:
        shape, x2 = x.shape, _bf16_rows(x, in_f, perm)
        if k_pad != in_f:  # decode runs this per layer and token: no copies when none are needed
            x2 = F.pad(x2, (0, k_pad - in_f))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w, gk, sz)
        if n_pad != out_f:
            y = y[:, :out_f]
        if b is not None:
            y = y + b
        return y.to(x.dtype).reshape(*shape[:-1], out_f)
    return forward


def _bf16_rows(x: Tensor, in_f: int, perm: Tensor | None) -> Tensor:
    """Activations as bf16 rows [tokens, in_f] (the ops' fast path), columns in the weight's order."""
    x2 = x.reshape(-1, in_f).to(torch.bfloat16)
    return x2 if perm is None else x2[:, perm]


def supports_int8(p: PackedLinear) -> bool:
    return p.format == "int" and p.meta["bits"] == 8


def prepare_int8(p: PackedLinear, bias: Tensor | None):
    """int8 codes, per channel or per group: y = Σ_g (x_g·((q_g-128)·s_g)ᵀ + Σx_g·(128-z_g)·s_g).

    torch's int8 op takes one scale per output channel, so groups run as one call each on
    contiguous column slices (act-order columns are sorted by group first); the zero-point
    correction is exact.
    """
    codes, scales, zeros, g_idx = int_parts(p)
    out_f, in_f = p.shape
    perm = torch.argsort(g_idx, stable=True) if "g_idx" in p.tensors else None
    if perm is not None:
        codes, g_idx = codes[:, perm], g_idx[perm]
    bounds = torch.searchsorted(g_idx, torch.arange(scales.shape[1] + 1, dtype=g_idx.dtype)).tolist()
    parts = []
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a == b:
            continue
        k_pad = -(-(b - a) // 32) * 32  # the op crashes on some K that are not multiples of 16
        w = F.pad(codes[:, a:b] - 128, (0, k_pad - (b - a))).to(torch.int8).contiguous()
        corr = ((128 - zeros[:, g]) * scales[:, g]).to(torch.bfloat16)
        parts.append((a, b, k_pad, w, scales[:, g].to(torch.bfloat16).contiguous(),
                      corr if bool((zeros[:, g] != 128).any()) else None))
    b_ = None if bias is None else bias.to(torch.bfloat16)

    def forward(x: Tensor) -> Tensor:
        shape, x2 = x.shape, _bf16_rows(x, in_f, perm)
        y = None
        for a, b, k_pad, w, s, corr in parts:
            xg = F.pad(x2[:, a:b], (0, k_pad - (b - a))).contiguous()
            yg = torch.ops.aten._weight_int8pack_mm(xg, w, s)
            if corr is not None:
                yg = yg + xg.sum(-1, keepdim=True) * corr
            y = yg.float() if y is None else y + yg  # sum the groups in fp32
        if b_ is not None:
            y = y + b_
        return y.to(x.dtype).reshape(*shape[:-1], out_f)
    return forward
