"""NUPES (Yvinec et al.): non-uniform quantization on a power grid, data-free and data-driven.

A weight w is quantized as u = sign(w)|w|^a on a uniform symmetric grid (codes q - z0, z0 =
2^(b-1), per-group scales) and restored as sign(û)|û|^(1/a). Since |(q - z0)s|^(1/a) =
|q - z0|^(1/a) s^(1/a), every layer is a table of 2^b values times a per-group scale: the "lut"
format (quantkit/formats/lut.py). a = 1 is the uniform symmetric grid.

Choices of ours where the paper is silent (see ALGORITHMS.md):
- one exponent per layer (the table is per layer), searched on a coarse grid then refined by
  golden section; the error is locally convex in a (PowerQuant), the grid guards against the
  non-convex far field;
- rounding goes to the nearest grid value in weight space, which on a non-uniform grid is what
  minimises each element's error; at a = 1 it is round-to-nearest;
- scales: the min-max / shrink search of the uniform grid (quant/grid.py), run on the power
  grid with the error measured in weight space (weighted by diag H when data are available).
  A symmetric 2^b-level grid has one more level below zero than above; a group whose largest
  magnitude is positive gets a negative scale, which mirrors the grid at no storage cost and
  makes Q(-W) = -Q(W) hold exactly;
- data-driven: the exponent minimises the layer proxy tr(E H Eᵀ), E = W - Ŵ; the weights are
  then placed on the grid with GPTQ's error feedback and refined by latent weights learned with
  a straight-through estimator and Adam on the proxy (free to cross any number of levels);
  the best point seen is kept, so the result is never worse on the proxy than plain rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.lut import lut_dequantize, lut_storage_bits, make_lut
from quantkit.formats.packed import PackedLinear, group_index
from quantkit.quant.base import LayerStats, QSpec, group_width, proxy_loss
from quantkit.quant.gptq import feedback, inverse_hessian_factor, live_columns
from quantkit.quant.grid import _to_storage
from quantkit.registry import register

EXPONENT_GRID = tuple(round(0.3 + 0.1 * i, 2) for i in range(11))   # 0.3 .. 1.3
SEARCH_ROWS = 128          # rows the exponent search looks at
COARSE, FINE = 0.04, 0.01  # shrink steps of the scale search (20 coarse, then 7 fine candidates)


def power_lut(bits: int, a: float) -> Tensor:
    """Table [2^bits] of sign(k - z0)|k - z0|^(1/a) / z0^(1/a), so that max |lut| = 1."""
    z0 = 1 << (bits - 1)
    k = torch.arange(1 << bits, dtype=torch.float64) - z0
    return (k.sign() * (k.abs() / z0) ** (1.0 / a)).to(torch.float32)


def nearest_codes(V: Tensor, lut: Tensor) -> Tensor:
    """Index (int64) of the nearest value of the increasing table `lut` to each element of V."""
    mids = (lut[1:] + lut[:-1]) / 2
    if lut.numel() > 16:
        return torch.bucketize(V, mids.to(V.device))
    # counting the midpoints below v is bucketize's answer, several times faster for short tables
    codes = torch.zeros(V.shape, dtype=torch.uint8, device=V.device)
    for m in mids.tolist():
        codes += V > m
    return codes.long()


def _grouped(W: Tensor, gw: int) -> Tensor:
    """W [out, in] as [out, G, gw], the last group zero-padded (zeros quantize to 0 exactly)."""
    out_f, in_f = W.shape
    G = -(-in_f // gw)
    return F.pad(W, (0, G * gw - in_f)).view(out_f, G, gw)


def fit_power_scales(W: Tensor, a: float, spec: QSpec, weight: Tensor | None = None,
                     flip: bool = True, steps: tuple[float, float] = (COARSE, FINE),
                     norm: float = 2.4) -> Tensor:
    """Signed scales [out, G] (fp16 values in fp32) of the normalised power grid for W [out, in].

    Min-max: û's range is ±max|w|^a as in the symmetric uniform grid (minmax_grid), which
    a = 1 without `flip` reproduces exactly. With spec.mse the range shrinks (a coarse pass of
    `steps[0]`, then ±3 `steps[1]` around the best) to minimise Σ weight·|ŵ - w|^norm per group,
    norm 2.4 as in quant/grid.py. `flip`: negative scales where the largest magnitude is positive.
    """
    gw = group_width(W.shape[1], spec)
    W3 = _grouped(W, gw)
    w3 = None if weight is None else _grouped(weight[None], gw)[0]
    lut = power_lut(spec.bits, a).to(W.device)
    maxq = (1 << spec.bits) - 1
    c = float(1 << (spec.bits - 1)) ** (1.0 / a)     # undoes the table's normalisation
    wmax = W3.abs().amax(-1)
    umax = torch.where(wmax == 0, 1.0, wmax if a == 1 else wmax.pow(a))
    sign = torch.where(W3.amax(-1) > -W3.amin(-1), -1.0, 1.0) if flip else 1.0

    def scale(p: Tensor | float) -> Tensor:
        s_u = _to_storage(2 * (p * umax) / maxq)     # the uniform grid's scale on û
        return _to_storage((s_u if a == 1 else s_u.pow(1.0 / a)) * c) * sign

    def error(s: Tensor) -> Tensor:
        V = W3 / s[..., None]
        err = (lut[nearest_codes(V, lut)] - V).abs_().pow_(norm)
        err = (err * w3).sum(-1) if w3 is not None else err.sum(-1)
        return err * s.abs().pow(norm)

    if not spec.mse:
        return scale(1.0)
    best_p = torch.ones_like(umax)
    best = error(scale(best_p))

    def consider(p: Tensor) -> None:
        nonlocal best, best_p
        err = error(scale(p))
        better = err < best
        best, best_p = torch.where(better, err, best), torch.where(better, p, best_p)

    for i in range(1, round(0.8 / steps[0])):
        consider(torch.full_like(umax, 1 - steps[0] * i))
    centre = best_p                                  # fine pass around each group's best
    for k in (-3, -2, -1, 1, 2, 3):
        consider((centre + steps[1] * k).clamp(0.2, 1.0))
    return scale(best_p)


def power_quantize(W: Tensor, a: float, spec: QSpec, weight: Tensor | None = None, flip: bool = True,
                   steps: tuple[float, float] = (COARSE, FINE)) -> tuple[Tensor, Tensor, Tensor]:
    """(codes [out, in], signed scales [out, G], lut [2^b]) of W on the power grid of exponent a."""
    W = W.float()
    scales = fit_power_scales(W, a, spec, weight, flip, steps)
    lut = power_lut(spec.bits, a).to(W.device)
    S = scales[:, group_index(W.shape[1], spec.group_size, W.device).long()]
    return nearest_codes(W / S, lut), scales, lut


def fake_quantize(W: Tensor, a: float, spec: QSpec, weight: Tensor | None = None, flip: bool = True,
                  steps: tuple[float, float] = (COARSE, FINE)) -> Tensor:
    """Q_a(W): the weight the "lut" format stores for W at exponent a (fp32, bit-exact)."""
    codes, scales, lut = power_quantize(W, a, spec, weight, flip, steps)
    return lut_dequantize(codes, lut, scales, group_index(W.shape[1], spec.group_size, W.device).long())


def search_exponent(loss, grid: tuple[float, ...] = EXPONENT_GRID, refine: int = 5) -> float:
    """argmin of loss(a): best point of a coarse grid, then golden section between its neighbours."""
    seen = {a: loss(a) for a in grid}
    i = min(range(len(grid)), key=lambda k: seen[grid[k]])
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    r = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
    f1, f2 = loss(x1), loss(x2)
    seen[x1], seen[x2] = f1, f2
    for _ in range(refine):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - r * (hi - lo)
            f1 = seen[x1] = loss(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (hi - lo)
            f2 = seen[x2] = loss(x2)
    return min(seen, key=seen.get)


def _search_rows(W: Tensor, rows: int = SEARCH_ROWS) -> Tensor:
    # The exponent is one number per layer: evenly spread rows estimate its loss well enough
    # at a fraction of the cost on wide layers.
    if W.shape[0] <= rows:
        return W
    return W[torch.linspace(0, W.shape[0] - 1, rows, device=W.device).long()]


_SEARCH_STEPS = (0.08, 0.02)     # a coarser shrink search is enough to rank exponents


def data_free_exponent(W: Tensor, spec: QSpec) -> float:
    """Exponent minimising ||W - Q_a(W)||² (PowerQuant's criterion), on a subset of rows."""
    Ws = _search_rows(W.float())
    return search_exponent(
        lambda a: float((Ws - fake_quantize(Ws, a, spec, steps=_SEARCH_STEPS)).pow(2).sum()))


def data_driven_exponent(W: Tensor, H: Tensor, spec: QSpec) -> float:
    """Exponent minimising the proxy tr(E H Eᵀ), scales fitted with diag(H) weights."""
    Ws, d = _search_rows(W.float()), H.diagonal()
    return search_exponent(
        lambda a: proxy_loss(Ws - fake_quantize(Ws, a, spec, d, steps=_SEARCH_STEPS), H))


def gptq_lut_codes(W: Tensor, H: Tensor, scales: Tensor, lut: Tensor, g_idx: Tensor, damp: float,
                   act_order: bool = True, block: int = 128) -> Tensor:
    """Codes [out, in] on a fixed table grid by GPTQ's column-wise error feedback (quant.gptq's
    loop, with blocks of `block` columns and this grid's rounder).

    The grid (table and per-group scales) is fixed up front, so act-order needs no g_idx:
    columns go in order of decreasing diag H, each rounded to its nearest grid value, and the
    rounding error is spread over the columns still to come through the inverse Hessian.
    """
    W, H = live_columns(W, H)
    perm = (torch.argsort(H.diagonal(), descending=True) if act_order
            else torch.arange(W.shape[1], device=W.device))
    W, H, S = W[:, perm].t().contiguous(), H[perm][:, perm], scales[:, g_idx[perm]].t().contiguous()

    def nearest(j: int, Wt: Tensor) -> tuple[Tensor, Tensor]:
        q = nearest_codes(Wt[j] / S[j], lut)
        return q, lut[q] * S[j]
    codes_t, _ = feedback(W, inverse_hessian_factor(H, damp), nearest, block, block)
    return codes_t.long().t()[:, torch.argsort(perm)].contiguous()


def refit_scales(W: Tensor, H: Tensor, codes: Tensor, scales: Tensor, lut: Tensor, gw: int) -> Tensor:
    """Scales [out, G] minimising tr(E H Eᵀ) for fixed codes (contiguous groups of width gw).

    Row r's error is w_r - Σ_g S_rg l_rg with l_rg = lut[codes] on group g: a G×G least-squares
    problem per row, A_r S_r = b_r with A_r[h, g] = l_rh H l_rgᵀ, b_r[h] = l_rh H w_rᵀ. The
    result is rounded to fp16 as it will be stored.
    """
    out_f, in_f = W.shape
    G = scales.shape[1]
    Lv = lut[codes]
    B = torch.stack([Lv[:, h * gw:(h + 1) * gw] @ H[h * gw:(h + 1) * gw] for h in range(G)], 1)
    pad = G * gw - in_f
    A = (F.pad(B, (0, pad)).view(out_f, G, G, gw) * F.pad(Lv, (0, pad)).view(out_f, 1, G, gw)).sum(-1)
    b = (B * W[:, None, :]).sum(-1)
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    S = torch.linalg.solve(A + ridge[:, None, None] * torch.eye(G, device=W.device), b)
    S = torch.where(S.isfinite(), S, scales)
    return _to_storage(S.abs()) * torch.where(S < 0, -1.0, 1.0)


def learn_codes(W: Tensor, H: Tensor, codes: Tensor, scales: Tensor, lut: Tensor, g_idx: Tensor,
                steps: int = 300, lr: float = 0.005) -> tuple[Tensor, float, float]:
    """Codes that lower tr(E H Eᵀ), learned over the whole grid by a straight-through estimator.

    A latent V (table units, one per weight, started at the given codes' values) follows Adam
    on the proxy's gradient at its rounded point, -2 (E H) ⊙ S; it may cross any number of
    levels. lr is in mean grid steps per iteration (thousands of codes flip back and forth
    every step, so E H is recomputed densely). Returns (best codes seen, their proxy, the proxy
    of the given codes); the best is the input when nothing beat it.
    """
    W, H = W.float(), H.float()
    S = scales[:, g_idx]
    cur = best_codes = codes.long()
    E = W - lut[cur] * S
    G = E @ H
    start = best = float((G * E).sum())
    V = lut[cur]
    m, v = torch.zeros_like(V), torch.zeros_like(V)
    step = lr * 2 / (lut.numel() - 1)
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        grad = G.mul_(S).mul_(-2)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(1e-20)
        V = V.addcdiv(m, denom, value=-step / (1 - b1 ** t)).clamp_(float(lut[0]), float(lut[-1]))
        cur = nearest_codes(V, lut)
        E = W - lut[cur] * S
        G = E @ H
        loss = float((G * E).sum())
        if loss < best:
            best, best_codes = loss, cur
    return best_codes, best, start


@register("compressor", "nupes-df")
def nupes_df(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """Data-free NUPES: the exponent minimising the weights' own error; ignores the statistics."""
    a = data_free_exponent(W, spec)
    codes, scales, lut = power_quantize(W, a, spec)
    return make_lut(codes, lut, scales, spec.bits, spec.group_size, exponent=a)


nupes_df.needs_stats = False


@register("compressor", "nupes")
def nupes(W: Tensor, stats: LayerStats | None, spec: QSpec, feedback: bool = True,
          learn_steps: int = 0, lr: float = 0.005) -> PackedLinear:
    """Data-driven NUPES: exponent and scales on the proxy, then weights placed on the grid.

    feedback: GPTQ's error feedback on the power grid, then the scales refitted in closed form
    for those codes. learn_steps: straight-through Adam over the grid (learn_codes) from the
    best point so far. Each stage is kept only where it lowers the proxy tr(E H Eᵀ), so the
    result is never worse than plain rounding to the nearest grid value.
    """
    if stats is None:
        raise QuantkitError("NUPES needs calibration statistics (a Hessian); use nupes-df without data")
    W, H = W.float(), stats.H.float()
    a = data_driven_exponent(W, H, spec)
    codes, scales, lut = power_quantize(W, a, spec, H.diagonal())
    g = group_index(W.shape[1], spec.group_size, W.device).long()
    best = proxy_loss(W - lut_dequantize(codes, lut, scales, g), H)

    def keep(c: Tensor, s: Tensor) -> None:
        nonlocal codes, scales, best
        loss = proxy_loss(W - lut_dequantize(c, lut, s, g), H)
        if loss < best:
            codes, scales, best = c, s, loss

    if feedback:
        keep(gptq_lut_codes(W, H, scales, lut, g, spec.damp, spec.act_order), scales)
        keep(codes, refit_scales(W, H, codes, scales, lut, group_width(W.shape[1], spec)))
    if learn_steps > 0:
        keep(learn_codes(W, H, codes, scales, lut, g, learn_steps, lr)[0], scales)
    return make_lut(codes, lut, scales, spec.bits, spec.group_size, exponent=a)


@register("compressor", "nupes-ste")
def nupes_ste(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """NUPES with straight-through learning from plain rounding only (no GPTQ feedback)."""
    return nupes(W, stats, spec, feedback=False, learn_steps=300)


def _storage_floor(out_f: int, in_f: int, spec: QSpec) -> int:
    """The fewest bits a layer can take (the lut format without g_idx)."""
    return lut_storage_bits(out_f, in_f, spec.bits, spec.group_size)


nupes.storage_floor = nupes_df.storage_floor = nupes_ste.storage_floor = _storage_floor
