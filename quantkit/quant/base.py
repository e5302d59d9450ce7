"""What a compressor sees (LayerStats), how it quantizes (QSpec), and group-wise grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from quantkit.formats.packed import PackedLinear, int_storage_bits, n_groups
from quantkit.quant.grid import fit_grid

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class LayerStats:
    """What a compressor may know about one linear layer's inputs."""
    H: Tensor                       # [in, in] mean of x xᵀ over tokens (fp32)
    n: int                          # tokens seen
    act_absmax: Tensor | None = None
    cross: Tensor | None = None     # [in, in] mean of x_fp xᵀ: inputs of the unquantized model


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


def storage_floor(compressor, out_f: int, in_f: int, spec: QSpec) -> int:
    """The fewest bits `compressor` stores for an [out_f, in_f] layer at `spec`, from the shape:
    its own `storage_floor` attribute, else the plain integer format's (without g_idx)."""
    own = getattr(compressor, "storage_floor", None)
    if own is not None:
        return own(out_f, in_f, spec)
    return int_storage_bits(out_f, in_f, spec.bits, spec.group_size, spec.sym)


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


def proxy_loss(E: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ): the layer's output error on the calibration inputs (H = mean x xᵀ)."""
    return float(((E @ H) * E).sum())


def fp_target_weight(W: Tensor, stats: LayerStats, damp: float = 0.01) -> Tensor:
    """The weight V that best maps this layer's actual inputs to the full-precision outputs.

    argmin_V Σ_t ||W x_fp,t - V x_t||² = W C H⁻¹ with C = E[x_fp xᵀ], H = E[x xᵀ]. Since the
    residual W x_fp - V x is orthogonal to the span of the x, quantizing V against H then
    minimises ||W X_fp - Q X||² up to a constant: upstream quantization error is compensated.
    Written as W + W (C - H) H⁻¹ with H damped only in the correction, so that V = W exactly
    when the inputs did not drift.
    """
    if stats.cross is None:
        return W
    eye = torch.eye(stats.H.shape[0], device=W.device)
    L = torch.linalg.cholesky(stats.H + damp * stats.H.diagonal().mean() * eye)
    return W + torch.cholesky_solve((W @ (stats.cross - stats.H)).t(), L).t()
