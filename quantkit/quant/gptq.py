"""GPTQ (Frantar et al.): column-by-column rounding with inverse-Hessian error feedback.

Own implementation of the published algorithm with two-level lazy batching: error
feedback is applied as a rank-1 update only inside a small inner block of columns and
as matrix products everywhere else. Weights are processed transposed so that each
column is a contiguous row. Groups are fitted on fully up-to-date weights: outer
blocks are a multiple of the group width, inner blocks divide it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, make_int, make_levels, n_groups
from quantkit.formats.packing import words_per_row
from quantkit.quant.base import LayerStats, QSpec, fit_groups, group_width, proxy_loss
from quantkit.quant.grid import fit_grid
from quantkit.quant.levels import column_levels
from quantkit.registry import register


def inverse_hessian_factor(H: Tensor, damp: float, tries: int = 6) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, raising λ tenfold on failure."""
    lam = damp * H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        lam = lam * 10
    raise QuantkitError("GPTQ: the Hessian is not positive definite even with strong damping; "
                        "use more calibration tokens or a larger --damp")


def _blocks(in_f: int, gw: int, dynamic: bool, block: int, inner: int) -> tuple[int, int]:
    if not dynamic:
        return block, inner
    outer = gw * max(1, block // gw)        # a whole number of groups
    return outer, math.gcd(inner, gw)       # divides the group width


def gptq_codes(W: Tensor, H: Tensor, spec: QSpec, block: int = 128, inner: int = 16,
               levels: Tensor | None = None, col_loss: Tensor | None = None,
               keep: Tensor | None = None, nm: tuple[int, int] | None = None,
               round_values: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GPTQ on W [out, in] with Hessian H [in, in].

    Returns codes [out, in] (original column order), scales and zeros [out, G], and g_idx
    [in]: the group of each column.

    levels [in] (BAQ): column j gets levels[j] grid points spread over its group's range,
    w = (q·r - z)·s with r = (2^bits - 1)/(levels[j] - 1) and q < levels[j]; one level prunes
    the column to 0. All levels = 2^bits is plain GPTQ. col_loss [in], when given, receives
    each column's share of the GPTQ loss, Σ_rows (w - ŵ)² / [H⁻¹]_jj.

    Pruning (SparseGPT, Frantar & Alistarh): keep [out, in] bool marks the weights kept; with
    nm = (n, m) it is filled in place as the columns are reached: in every m consecutive columns
    each row keeps the n weights of largest w²/[U]_jj² (U the upper Cholesky factor of H⁻¹),
    judged on the error-updated weights; without nm it is a fixed mask. Pruned weights become 0
    and their error is fed back like a rounding error. round_values False: prune only; the first
    result is then the updated weights (float), not codes. Both need act_order off.
    """
    out_f, in_f = W.shape
    if (keep is not None or nm is not None) and spec.act_order:
        raise QuantkitError("pruning keeps groups of consecutive columns: use act_order off")
    if nm is not None and (keep is None or inner % nm[1] or block % nm[1]):
        raise ValueError("nm pruning needs a keep tensor to fill and blocks that are multiples of m")
    W, H = W.float().clone(), H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
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
        W, H = W[:, perm], H[perm][:, perm]
        if not dynamic:
            g_idx = g_idx[perm]
    U = inverse_hessian_factor(H, spec.damp)
    Wt = W.t().contiguous()                 # row j = column j (processing order)
    codes_t = torch.empty_like(Wt)
    maxq = (1 << spec.bits) - 1
    outer, inner = _blocks(in_f, gw, dynamic, block, inner)
    # per-group scale/zero as contiguous rows; group of each processed column as a Python int
    st, zt = scales.t().contiguous(), zeros.t().contiguous()
    col_group = None if dynamic else g_idx.tolist()
    diag = U.diagonal().tolist()
    if levels is not None:
        lv = (levels if perm is None else levels[perm]).tolist()
        ratio = [maxq / (m - 1) if m > 1 else 0.0 for m in lv]
    losses = torch.empty(in_f, device=W.device) if col_loss is not None else None
    keep_t = None if keep is None else keep.t().contiguous()
    for i1 in range(0, in_f, outer):
        i2 = min(i1 + outer, in_f)
        err = torch.empty(i2 - i1, out_f, device=W.device)
        for k1 in range(i1, i2, inner):
            k2 = min(k1 + inner, i2)
            for j in range(k1, k2):
                if dynamic:
                    g = j // gw
                    if j % gw == 0:
                        s, z = fit_grid(Wt[j:j + gw].t(), spec.bits, spec.sym, spec.mse)
                        st[g], zt[g] = s, z
                else:
                    g = col_group[j]
                s, z = st[g], zt[g]
                w = Wt[j]
                if nm is not None and j % nm[1] == 0:   # choose this group's kept weights now
                    score = Wt[j:j + nm[1]] ** 2 / U.diagonal()[j:j + nm[1], None] ** 2
                    top = torch.topk(score, nm[0], dim=0).indices
                    keep_t[j:j + nm[1]] = torch.zeros_like(score, dtype=torch.bool).scatter_(0, top, True)
                if not round_values:
                    q = deq = w * keep_t[j]
                elif levels is None or ratio[j] == 1.0:
                    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
                    deq = (q - z) * s
                elif ratio[j]:
                    q = torch.clamp(torch.round((w / s + z) / ratio[j]), 0, lv[j] - 1)
                    deq = (q * ratio[j] - z) * s
                else:
                    q = deq = torch.zeros_like(w)
                if keep_t is not None and round_values:
                    deq = deq * keep_t[j]
                codes_t[j] = q
                e = torch.sub(w, deq).div_(diag[j])
                err[j - i1] = e
                if j + 1 < k2:
                    Wt[j + 1:k2].addr_(U[j, j + 1:k2], e, alpha=-1)
            if k2 < i2:
                Wt[k2:i2].addmm_(U[k1:k2, k2:i2].t(), err[k1 - i1:k2 - i1], alpha=-1)
        if losses is not None:
            losses[i1:i2] = (err * err).sum(1)
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1)
    scales, zeros = st.t().contiguous(), zt.t().contiguous()
    if dynamic:
        g_idx = torch.arange(in_f, device=W.device) // gw
    codes = codes_t.t()
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], g_idx[inv]
        if losses is not None:
            losses = losses[inv]
    if col_loss is not None:
        col_loss.copy_(losses)
    if keep is not None:
        keep.copy_(keep_t.t())
    codes = codes.to(torch.int32) if round_values else codes
    return codes.contiguous(), scales, zeros, g_idx


@register("compressor", "gptq")
def gptq(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """GPTQ compressor: needs the layer's Hessian."""
    if stats is None:
        raise QuantkitError("GPTQ needs calibration statistics (a Hessian)")
    codes, scales, zeros, g_idx = gptq_codes(W, stats.H, spec)
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
    loss = torch.empty(in_f, device=W.device)
    codes, scales, zeros, g_idx = gptq_codes(W, stats.H, spec, col_loss=loss)
    plain = make_int(codes, scales, None if spec.sym else zeros, spec.bits, spec.group_size, g_idx)
    # same stored size as GPTQ's packed codes, less one byte per column for its level count
    budget = 32 * out_f * words_per_row(in_f, spec.bits) - 8 * in_f
    levels = column_levels(loss.cpu(), out_f, spec.bits, budget).to(W.device)
    codes, scales, zeros, g_idx = gptq_codes(W, stats.H, spec, levels=levels)
    baq = make_levels(codes, levels, scales, None if spec.sym else zeros, spec.bits,
                      spec.group_size, g_idx)

    def proxy(p: PackedLinear) -> float:
        return proxy_loss(W - p.dequantize(), stats.H)
    return baq if not keep_better or proxy(baq) < proxy(plain) else plain
