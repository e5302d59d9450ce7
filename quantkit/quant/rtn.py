"""Round-to-nearest on a per-group grid (min-max or MSE shrink search)."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.packed import PackedLinear, group_index, make_int
from quantkit.quant.base import LayerStats, QSpec, fit_groups
from quantkit.quant.grid import quantize
from quantkit.registry import register


def rtn_codes(W: Tensor, spec: QSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(codes [out,in], scales [out,G], zeros [out,G]) by rounding to the nearest grid point."""
    W = W.float()
    scales, zeros = fit_groups(W, spec)
    g = group_index(W.shape[1], spec.group_size, W.device).long()
    codes = quantize(W, scales[:, g], zeros[:, g], spec.bits)
    return codes.to(torch.int32), scales, zeros


@register("compressor", "rtn")
def rtn(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """RTN compressor: ignores the statistics."""
    codes, scales, zeros = rtn_codes(W, spec)
    return make_int(codes, scales, None if spec.sym else zeros, spec.bits, spec.group_size)


rtn.needs_stats = False
