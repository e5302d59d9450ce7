"""What a compressor sees (LayerStats), how it quantizes (QSpec), and group-wise grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from quantkit.formats.packed import PackedLinear, n_groups
from quantkit.quant.grid import fit_grid

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class LayerStats:
    """What a compressor may know about one linear layer's inputs."""
    H: Tensor                       # [in, in] mean of x xᵀ over tokens (fp32)
    n: int                          # tokens seen
    act_absmax: Tensor | None = None


@dataclass(frozen=True)
class QSpec:
    """How to quantize one layer. group_size -1 means one group per output row."""
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True      # with act-order: groups fixed on the original column order
    mse: bool = True                # shrink-search the grid range instead of plain min-max
    damp: float = 0.01              # GPTQ: fraction of mean(diag H) added to the diagonal

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")


class Compressor(Protocol):
    def __call__(self, W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear: ...


def group_width(in_features: int, spec: QSpec) -> int:
    """Columns per group (the whole row for group_size -1)."""
    return in_features if spec.group_size <= 0 else min(spec.group_size, in_features)


def fit_groups(W: Tensor, spec: QSpec, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero per (row, contiguous group) of W [out, in]: two tensors [out, G]."""
    in_f = W.shape[1]
    gw = group_width(in_f, spec)
    scales, zeros = [], []
    for g in range(n_groups(in_f, spec.group_size)):
        cols = slice(g * gw, min((g + 1) * gw, in_f))
        s, z = fit_grid(W[:, cols], spec.bits, spec.sym, spec.mse,
                        None if weight is None else weight[cols])
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)
