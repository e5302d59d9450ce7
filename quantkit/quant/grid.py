"""Scale/zero fitting for affine integer grids (min-max and MSE shrink search)."""
from __future__ import annotations

import torch
from torch import Tensor


def _to_storage(scale: Tensor) -> Tensor:
    # Scales are stored in fp16: fit with the value that will be stored.
    return scale.clamp(min=1e-6, max=6e4).to(torch.float16).float()


def minmax_grid(x: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero per row of x [rows, cols] covering [min(x,0), max(x,0)]."""
    maxq = (1 << bits) - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = _to_storage((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes of x for per-row (or broadcastable) scale and zero."""
    return torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (q - zero) * scale


def fit_grid(x: Tensor, bits: int, sym: bool, mse: bool = False, weight: Tensor | None = None,
             norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Scale/zero per row; with `mse`, shrink the range to minimise Σ w·|x̂ - x|^norm.

    `weight` [cols] (e.g. diag of the Hessian) makes the search loss-aware; None is uniform.
    """
    scale, zero = minmax_grid(x, bits, sym)
    if not mse:
        return scale, zero
    maxq = (1 << bits) - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        lo, hi = p * xmin, p * xmax
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        s = _to_storage((hi - lo).clamp(min=1e-12) / maxq)
        z = zero if sym else torch.round(-lo / s).clamp(0, maxq)
        err = (dequantize(quantize(x, s[:, None], z[:, None], bits), s[:, None], z[:, None]) - x)
        err = err.abs().pow(norm)
        err = (err * weight).sum(1) if weight is not None else err.sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
