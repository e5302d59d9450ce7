"""Helpers every compressor shares: group-wise grids, the proxy loss, fp_target, storage floors
(the types themselves, LayerStats and QSpec, live in quantkit/types.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.packed import int_storage_bits, n_groups
from quantkit.quant.grid import fit_grid
from quantkit.stats.hessian import proxy_loss  # noqa: F401  (re-exported)
from quantkit.types import LayerStats, QSpec  # noqa: F401  (re-exported)


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


def live_hessian(H: Tensor) -> Tensor:
    """H with each dead input's diagonal (an input that was zero on every calibration token, so
    its whole row and column are zero) set to 1, so that H stays invertible even when the
    whole layer is dead; nothing couples a dead input to the others."""
    dead = H.diagonal() == 0
    return H + torch.diag(dead.to(H.dtype)) if bool(dead.any()) else H


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
    H = live_hessian(stats.H)
    L = H.clone()                      # H + λI, the same numbers as adding λ·eye
    L.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(L)
    drift = stats.cross - stats.H
    drift = W @ drift
    return W + torch.cholesky_solve(drift.t(), L).t()
