"""GPTQ (Frantar et al.): column-by-column rounding with inverse-Hessian error feedback.

Own implementation of the published algorithm with two-level lazy batching: error
feedback is applied as a rank-1 update only inside a small inner block of columns and
as matrix products everywhere else. Weights are processed transposed so that each
column is a contiguous row. Groups are fitted on fully up-to-date weights: outer
blocks are a multiple of the group width, inner blocks divide it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, make_int, make_levels, n_groups
from quantkit.formats.packing import words_per_row
from quantkit.quant.base import LayerStats, QSpec, fit_groups, group_width, live_hessian, proxy_loss
from quantkit.quant.grid import fit_grid
from quantkit.quant.levels import column_levels
from quantkit.registry import register


def inverse_hessian_factor(H: Tensor, damp: float, tries: int = 6) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, raising λ tenfold on failure."""
    lam = damp * H.diagonal().mean()
    for _ in range(tries):          # two [in, in] matrices alive at a time, beside H
        L, info = torch.linalg.cholesky_ex(damped(H, lam))
        if info == 0:
            L = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(L, upper=True)
            if info == 0:
                return U
        lam = lam * 10
    raise QuantkitError("GPTQ: the Hessian is not positive definite even with strong damping; "
                        "use more calibration tokens or a larger --damp")


def damped(H: Tensor, lam) -> Tensor:
    """H + λI as a new matrix (the same numbers as adding λ·eye, without the eye)."""
    out = H.clone()
    out.diagonal().add_(lam)
    return out


def _blocks(in_f: int, gw: int, dynamic: bool, block: int, inner: int) -> tuple[int, int]:
    if not dynamic:
        return block, inner
    outer = gw * max(1, block // gw)        # a whole number of groups
    return outer, math.gcd(inner, gw)       # divides the group width


Rounder = Callable[[int, Tensor], tuple[Tensor, Tensor]]
"""(j, Wt) -> (codes, dequantized values) of processed column j; rows j.. of Wt are up to date."""


def feedback(Wt: Tensor, U: Tensor, rounder: Rounder, block: int = 128,
             inner: int = 16) -> tuple[Tensor, Tensor]:
    """GPTQ's loop on Wt [in, out] (columns as rows, in processing order; updated in place)
    with U the upper Cholesky factor of H⁻¹: each column is rounded by `rounder` and its error,
    scaled by 1/U_jj, fed to the columns still to come: rank-1 inside an inner block, matrix
    products for the rest. Returns the codes [in, out] and each column's loss Σ_rows e² [in]."""
    n_in, out_f = Wt.shape
    codes_t = torch.empty_like(Wt)
    losses = torch.empty(n_in, device=Wt.device)
    diag = U.diagonal().tolist()
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        err = torch.empty(i2 - i1, out_f, device=Wt.device)
        for k1 in range(i1, i2, inner):
            k2 = min(k1 + inner, i2)
            for j in range(k1, k2):
                q, deq = rounder(j, Wt)
                codes_t[j] = q
                e = torch.sub(Wt[j], deq).div_(diag[j])
                err[j - i1] = e
                if j + 1 < k2:
                    Wt[j + 1:k2].addr_(U[j, j + 1:k2], e, alpha=-1)
            if k2 < i2:
                Wt[k2:i2].addmm_(U[k1:k2, k2:i2].t(), err[k1 - i1:k2 - i1], alpha=-1)
        losses[i1:i2] = (err * err).sum(1)
        if i2 < n_in:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1)
    return codes_t, losses


def live_columns(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Dead inputs (H_jj = 0) made harmless: their weights 0, H_jj 1 (W a copy; H a copy only
    when it changes: callers never write to it)."""
    W, H = W.float().clone(), H.float()
    W[:, H.diagonal() == 0] = 0
    return W, live_hessian(H)


def grid_rounder(spec: QSpec, st: Tensor, zt: Tensor, col_group: list[int] | None, gw: int,
                 levels: list[int] | None = None) -> Rounder:
    """Nearest point of the affine group grid (scales st, zeros zt [G, out], refitted on the
    updated weights at each group start when col_group is None: dynamic groups). levels
    (BAQ, processing order): column j gets levels[j] points spread over its group's range,
    w = (q·r - z)·s with r = (2^bits - 1)/(levels[j] - 1); one level prunes the column to 0."""
    maxq = (1 << spec.bits) - 1
    ratio = None if levels is None else [maxq / (m - 1) if m > 1 else 0.0 for m in levels]

    def round_column(j: int, Wt: Tensor) -> tuple[Tensor, Tensor]:
        if col_group is None:
            g = j // gw
            if j % gw == 0:
                st[g], zt[g] = fit_grid(Wt[j:j + gw].t(), spec.bits, spec.sym, spec.mse)
        else:
            g = col_group[j]
        s, z, w = st[g], zt[g], Wt[j]
        if ratio is None or ratio[j] == 1.0:
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            return q, (q - z) * s
        if ratio[j]:
            q = torch.clamp(torch.round((w / s + z) / ratio[j]), 0, levels[j] - 1)
            return q, (q * ratio[j] - z) * s
        zero = torch.zeros_like(w)
        return zero, zero
    return round_column


def masked_rounder(rounder: Rounder | None, keep_t: Tensor, U: Tensor,
                   nm: tuple[int, int] | None) -> Rounder:
    """Pruning (SparseGPT, Frantar & Alistarh): weights off keep_t [in, out] become 0 and their
    error is fed back like a rounding error. With nm = (n, m), keep_t is chosen as the columns
    are reached: in every m consecutive columns each row keeps the n weights of largest
    w²/U_jj², judged on the error-updated weights. rounder None: prune only (values kept)."""
    def round_column(j: int, Wt: Tensor) -> tuple[Tensor, Tensor]:
        if nm is not None and j % nm[1] == 0:
            score = Wt[j:j + nm[1]] ** 2 / U.diagonal()[j:j + nm[1], None] ** 2
            top = torch.topk(score, nm[0], dim=0).indices
            keep_t[j:j + nm[1]] = torch.zeros_like(score, dtype=torch.bool).scatter_(0, top, True)
        if rounder is None:
            v = Wt[j] * keep_t[j]
            return v, v
        q, deq = rounder(j, Wt)
        return q, deq * keep_t[j]
    return round_column


class GPTQCodes(NamedTuple):
    codes: Tensor            # [out, in] int32 codes (pruning only: the updated float weights)
    scales: Tensor           # [out, G]
    zeros: Tensor            # [out, G]
    g_idx: Tensor            # [in] the group of each column
    col_loss: Tensor         # [in] each column's share of the loss, Σ_rows (w - ŵ)² / U_jj²
    keep: Tensor | None      # [out, in] the kept weights (pruning)


def gptq_codes(W: Tensor, H: Tensor, spec: QSpec, block: int = 128, inner: int = 16,
               levels: Tensor | None = None, keep: Tensor | None = None,
               nm: tuple[int, int] | None = None, round_values: bool = True) -> GPTQCodes:
    """GPTQ on W [out, in] with Hessian H [in, in], codes and groups in the original column
    order. levels [in]: BAQ's level counts (grid_rounder). keep [out, in]: a fixed mask of
    the weights kept, or with nm the mask to start from, chosen group by group
    (masked_rounder); round_values False prunes only. Pruning needs act_order off."""
    out_f, in_f = W.shape
    if (keep is not None or nm is not None) and spec.act_order:
        raise QuantkitError("pruning keeps groups of consecutive columns: use act_order off")
    if nm is not None and (keep is None or inner % nm[1] or block % nm[1]):
        raise ValueError("nm pruning needs a keep tensor to start from and blocks that are multiples of m")
    W, H = live_columns(W, H)
    gw = group_width(in_f, spec)
    perm = torch.argsort(H.diagonal(), descending=True) if spec.act_order else None
    # Dynamic groups (refit when a group starts, on updated weights) unless act-order asks
    # for static ones; a single group per row is always fitted up front.
    dynamic = gw < in_f and not (spec.act_order and spec.static_groups)
    if not dynamic:
        scales, zeros = fit_groups(W, spec)
        g_idx = (torch.arange(in_f, device=W.device) // gw)
    else:
        scales = torch.empty(out_f, n_groups(in_f, spec.group_size), device=W.device)
        zeros = torch.empty_like(scales)
    if perm is not None:
        W, H = W[:, perm], H[perm]
        H = H[:, perm]
        if not dynamic:
            g_idx = g_idx[perm]
    U = inverse_hessian_factor(H, spec.damp)
    outer, inner = _blocks(in_f, gw, dynamic, block, inner)
    st, zt = scales.t().contiguous(), zeros.t().contiguous()   # groups as contiguous rows
    lv = None if levels is None else (levels if perm is None else levels[perm]).tolist()
    rounder = grid_rounder(spec, st, zt, None if dynamic else g_idx.tolist(), gw, lv)
    keep_t = None if keep is None else keep.t().contiguous()
    if keep_t is not None:
        rounder = masked_rounder(rounder if round_values else None, keep_t, U, nm)
    codes_t, losses = feedback(W.t().contiguous(), U, rounder, outer, inner)
    if dynamic:
        g_idx = torch.arange(in_f, device=W.device) // gw
    codes = codes_t.t()
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx, losses = codes[:, inv], g_idx[inv], losses[inv]
    codes = codes.to(torch.int32) if round_values else codes
    return GPTQCodes(codes.contiguous(), st.t().contiguous(), zt.t().contiguous(), g_idx, losses,
                     None if keep_t is None else keep_t.t().contiguous())


@register("compressor", "gptq")
def gptq(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """GPTQ compressor: needs the layer's Hessian."""
    if stats is None:
        raise QuantkitError("GPTQ needs calibration statistics (a Hessian)")
    codes, scales, zeros, g_idx = gptq_codes(W, stats.H, spec)[:4]
    return make_int(codes, scales, None if spec.sym else zeros, spec.bits, spec.group_size, g_idx)


@register("compressor", "gptq-baq")
def gptq_baq(W: Tensor, stats: LayerStats | None, spec: QSpec, keep_better: bool = True) -> PackedLinear:
    """BAQ: GPTQ at spec.bits measures each column's loss, the closed form reallocates levels
    across columns within the same stored size as plain GPTQ, and GPTQ runs again with them.

    The rate-loss model does not hold for every layer (on SmolLM2 it halves some layers' proxy
    loss and raises others' by up to a third), so the plain GPTQ result of the first pass is
    kept where it has the lower proxy loss tr(E H Eᵀ) (unless keep_better is False).
    """
    if stats is None:
        raise QuantkitError("GPTQ-BAQ needs calibration statistics (a Hessian)")
    out_f, in_f = W.shape
    codes, scales, zeros, g_idx, loss, _ = gptq_codes(W, stats.H, spec)
    plain = make_int(codes, scales, None if spec.sym else zeros, spec.bits, spec.group_size, g_idx)
    # same stored size as GPTQ's packed codes, less one byte per column for its level count
    budget = 32 * out_f * words_per_row(in_f, spec.bits) - 8 * in_f
    levels = column_levels(loss.cpu(), out_f, spec.bits, budget).to(W.device)
    codes, scales, zeros, g_idx = gptq_codes(W, stats.H, spec, levels=levels)[:4]
    baq = make_levels(codes, levels, scales, None if spec.sym else zeros, spec.bits,
                      spec.group_size, g_idx)

    def proxy(p: PackedLinear) -> float:
        return proxy_loss(W - p.dequantize(), stats.H)
    return baq if not keep_better or proxy(baq) < proxy(plain) else plain
