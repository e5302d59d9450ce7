"""ARMOR: an N:M-sparse core wrapped by block-diagonal matrices, W ≈ A·S·B, fitted layer by layer.

The fit follows LawrenceRLiu/ARMOR (src/ARMOR_compress.py, @3977e54) on the NoWag-normalised
weight W̄ = diag(1/r)·W·diag(1/c) (column norms c first, then row norms r of W/c), minimising

    L = Σ_ij h_j (W̄ − A S B)²_ij / Σ_ij h_j W̄²_ij,     h = diag of the input second moment E[x xᵀ].

Each iteration is one Adam step on the blocks of A, the blocks of B and the kept values of S
(mask fixed), then one support step: in every b×b tile one (row, m-group) is sampled ∝ |∂L/∂S|
(L1 over the group) and its best n-of-m support is found by closed-form least squares.
Tiles never interact (A and B share the tile grid), so all tiles are updated at once.

Where this differs from the reference (each keeps the method, makes it cheaper or safer):
- the best iterate is returned, and `losses` is its loss (the reference returns the last one;
  an Adam step can raise the loss, a support step never does);
- groups are sampled with the gradient that the Adam step used (the reference recomputes it
  after that step): saves two of eight block matmuls per iteration; the support choice itself
  uses the exact current residual, so only the sampling odds move, by one lr-sized step;
- a support step keeps the current group unless the least-squares candidate is strictly better;
- dimensions need not be multiples of b: blocks are stored padded as [n_blocks, b, b] and the
  block-diagonal matrix is cropped to d×d (the reference asserts divisibility);
- zero row/column norms are replaced by 1 (the reference adds 1e-5 to every norm);
- early stop when the best loss improved by ≤ tol (relative) for 100 iterations in a row
  (reference: the same patience, on the current loss with rtol 1e-6, atol 1e-8).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.sparse import block_diag_apply
from quantkit.prune.mask import check_width, is_nm, nm_mask

_PATIENCE = 100          # iterations without a tol-sized gain before stopping (reference yaml)
_DAMP = 1e-7             # relative ridge on the support least squares; candidates are re-scored exactly


@dataclass
class ArmorResult:
    """A factorization W ≈ blockdiag(post)[:out,:out] · core · blockdiag(pre)[:in,:in]."""
    post: Tensor      # [n_out_blocks, b, b] fp32: A with the row norms folded in, applied last
    core: Tensor      # [out, in] fp32, zero off `mask` (a kept value may itself be 0: use mask)
    mask: Tensor      # [out, in] bool, exactly n of every m along the input dim
    pre: Tensor       # [n_in_blocks, b, b] fp32: B with the column norms folded in, applied first
    losses: list[float]   # proxy loss of the best iterate after each iteration (index 0 = init)
    seconds: float


def armor_dense(r: ArmorResult) -> Tensor:
    """The reconstructed weight A @ core @ B, fp32 [out, in], in the original (unnormalised) space."""
    return block_diag_apply(r.post, block_diag_apply(r.pre, r.core.float(), "right"), "left")


def armor_proxy(W: Tensor, h: Tensor, post: Tensor, core: Tensor, pre: Tensor) -> float:
    """ARMOR's proxy L for folded factors: Σ h_j ((W − Ŵ)_ij / (r_i c_j))² / Σ h_j W̄²_ij, r, c from W."""
    Wn, r, c = _normalise(W.float())
    h = h.float()
    recon = armor_dense(ArmorResult(post, core, core != 0, pre, [], 0.0)) / r[:, None] / c[None, :]
    z = float((h * Wn.square()).sum())
    return float((h * (recon - Wn).square()).sum()) / z if z > 0 else 0.0


def armor_factorize(W: Tensor, h: Tensor, n: int = 2, m: int = 4, block_size: int = 32, iters: int = 3000,
                    lr: float = 1e-4, init_mask: Tensor | None = None, seed: int = 0,
                    tol: float = 1e-6) -> ArmorResult:
    """Fit W ≈ A·S·B (S n:m-sparse, A and B block-diagonal) by ARMOR's block coordinate descent."""
    start = time.perf_counter()
    _check_inputs(W, h, n, m, block_size, init_mask)
    pb = _Problem.build(W, h, n, m, block_size)
    st = _init_state(pb, init_mask)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    params = [st.A, st.B, st.S]
    opt = torch.optim.Adam(params, lr=lr, fused=W.device.type in ("cpu", "cuda"))
    loss = _refresh_grad_input(pb, st)
    best = _Snapshot.take(st, loss)
    losses, stall = [loss], 0
    for _ in range(iters):
        st.A.grad, st.B.grad = _gradients(st)
        st.S.grad = st.gS
        opt.step()
        st.S.mul_(st.keep)            # Adam momentum would otherwise revive dropped weights
        _forward(pb, st)
        _support_step(pb, st, gen)
        loss = _refresh_grad_input(pb, st)
        prev = best.loss
        if loss < best.loss:
            best.update(st, loss)
        losses.append(best.loss)
        stall = stall + 1 if prev - best.loss <= tol * prev else 0
        if stall >= _PATIENCE:
            break
    return _fold(pb, best, losses, time.perf_counter() - start)


# ----------------------------------------------------------------------------- internals


def _normalise(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """NoWag normalisation: W̄ = W / c (column norms) / r (row norms of W / c)."""
    c = W.norm(dim=0)
    c = torch.where(c > 0, c, torch.ones_like(c))
    Wc = W / c[None, :]
    r = Wc.norm(dim=1)
    r = torch.where(r > 0, r, torch.ones_like(r))
    return Wc / r[:, None], r, c


def _check_inputs(W: Tensor, h: Tensor, n: int, m: int, b: int, init_mask: Tensor | None) -> None:
    if W.dim() != 2:
        raise QuantkitError(f"ARMOR: weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    out_f, in_f = W.shape
    if not 0 < n < m:
        raise QuantkitError(f"ARMOR: pattern {n}:{m} needs 0 < n < m")
    check_width(in_f, m, "ARMOR")
    if b <= 0 or b % m:
        raise QuantkitError(f"ARMOR: block_size {b} must be a positive multiple of m = {m}")
    if h.shape != (in_f,) or not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise QuantkitError(f"ARMOR: h must be a finite, non-negative vector of length {in_f} "
                            "(the diagonal of the input second moment)")
    if init_mask is not None and (init_mask.shape != W.shape or not is_nm(init_mask.bool(), n, m)):
        raise QuantkitError(f"ARMOR: init_mask must be a {n}:{m} mask of shape {tuple(W.shape)}")


def _col_blocks(X: Tensor, b: int) -> Tensor:
    """[rows, nb·b] -> [nb, rows, b]: column-block-major, so that tile (j, k) is the contiguous
    X_t[k, j·b:(j+1)·b] and the tiles of a whole matrix are a free view [nb·rows/b, b, b]."""
    rows, cols = X.shape
    return X.view(rows, cols // b, b).transpose(0, 1).contiguous()


@dataclass
class _Problem:
    """The fixed data of one fit, padded to whole b×b tiles (padding: W̄ = 0, h = 0).

    Tiles are numbered column block first: t = k·n_out_blocks + j (the order of _col_blocks)."""
    Wt: Tensor        # [n_in_blocks, Do, b] normalised weight, zero-padded, column-block-major
    hw2: Tensor       # [n_in_blocks, 1, b] 2·h / Σ h W̄²: turns the residual into ∂L/∂(ASB)
    hw: Tensor        # [Di] h, zero on padded columns
    r: Tensor         # [out] row norms
    c: Tensor         # [in] column norms
    valid: Tensor     # [tiles, b·b/m] float, 1 where the group lies inside the real matrix
    combos: Tensor    # [C, n] every n-of-m support
    padded: bool      # some tile reaches past the real matrix
    shape: tuple[int, int]
    b: int
    n: int
    m: int

    @staticmethod
    def build(W: Tensor, h: Tensor, n: int, m: int, b: int) -> _Problem:
        out_f, in_f = W.shape
        Wn, r, c = _normalise(W.float())
        nob, nib = -(-out_f // b), -(-in_f // b)
        Wp = torch.zeros(nob * b, nib * b, device=W.device)
        Wp[:out_f, :in_f] = Wn
        hw = torch.zeros(nib * b, device=W.device)
        hw[:in_f] = h.float()
        z = float((hw[:in_f] * Wn.square()).sum())
        hw2 = hw * (2.0 / z) if z > 0 else torch.zeros_like(hw)
        real = torch.zeros(nob * b, nib * b // m, device=W.device)
        real[:out_f, :in_f // m] = 1.0
        valid = real.view(nob, b, nib, b // m).permute(2, 0, 1, 3).reshape(nob * nib, -1)
        combos = torch.tensor(list(itertools.combinations(range(m), n)), device=W.device)
        return _Problem(_col_blocks(Wp, b), hw2.view(nib, 1, b), hw, r, c, valid, combos,
                        (out_f, in_f) != tuple(Wp.shape), (out_f, in_f), b, n, m)

    def dense_target(self) -> Tensor:
        """W̄ as a padded row-major [Do, Di] matrix."""
        nib, Do, b = self.Wt.shape
        return self.Wt.transpose(0, 1).reshape(Do, nib * b)


@dataclass
class _State:
    """The iterate (A, S, B, mask) and the products kept current with it: P = A·S, E = P·B − W̄."""
    A: Tensor         # [n_out_blocks, b, b]
    B: Tensor         # [n_in_blocks, b, b]
    S: Tensor         # [Do, Di], zero off the mask and on padding
    keep: Tensor      # [Do, Di] the mask as 1.0/0.0 (float: multiplying by a bool mask casts every time)
    P: Tensor         # [Do, Di]
    E: Tensor         # [n_in_blocks, Do, b] (column-block-major, like W̄)
    G: Tensor         # ∂L/∂(ASB) at the current iterate, laid out like E
    dP: Tensor        # [Do, Di] work buffers, reused: a fresh multi-MB tensor per iteration costs
    dS: Tensor        # page faults. dS = ∂L/∂S everywhere (off-mask too: it drives sampling)
    gS: Tensor        # dS on the mask: Adam's gradient for S


@dataclass
class _Snapshot:
    """The best iterate seen so far."""
    A: Tensor
    B: Tensor
    S: Tensor
    keep: Tensor
    loss: float

    @staticmethod
    def take(st: _State, loss: float) -> _Snapshot:
        return _Snapshot(st.A.clone(), st.B.clone(), st.S.clone(), st.keep.clone(), loss)

    def update(self, st: _State, loss: float) -> None:
        for dst, src in ((self.A, st.A), (self.B, st.B), (self.S, st.S), (self.keep, st.keep)):
            dst.copy_(src)
        self.loss = loss


def _new_state(pb: _Problem, A: Tensor, B: Tensor, S: Tensor, keep: Tensor) -> _State:
    """A state with its products P, E and G computed."""
    st = _State(A, B, S * keep, keep, torch.empty_like(S), torch.empty_like(pb.Wt), torch.empty_like(pb.Wt),
                torch.empty_like(S), torch.empty_like(S), torch.empty_like(S))
    _forward(pb, st)
    _refresh_grad_input(pb, st)
    return st


def _init_state(pb: _Problem, init_mask: Tensor | None) -> _State:
    """A = B = I, S = W̄ on the NoWag-P mask (top n of W̄²·h per group) or on init_mask."""
    out_f, in_f = pb.shape
    Wp = pb.dense_target()
    Wn = Wp[:out_f, :in_f]
    real = nm_mask(Wn.square() * pb.hw[None, :in_f], pb.n, pb.m) if init_mask is None else init_mask.bool()
    keep = torch.zeros_like(Wp)
    keep[:out_f, :in_f] = real.to(Wp.device)
    eye = torch.eye(pb.b, device=Wp.device)
    return _new_state(pb, eye.repeat(Wp.shape[0] // pb.b, 1, 1), eye.repeat(Wp.shape[1] // pb.b, 1, 1), Wp, keep)


def _forward(pb: _Problem, st: _State) -> None:
    """Recompute P = A·S and E = P·B − W̄ from scratch (one bmm over row blocks, one over column blocks)."""
    nob, b, _ = st.A.shape
    Do = st.S.shape[0]
    torch.bmm(st.A, st.S.view(nob, b, -1), out=st.P.view(nob, b, -1))
    torch.bmm(st.P.view(Do, -1, b).transpose(0, 1), st.B, out=st.E).sub_(pb.Wt)


def _refresh_grad_input(pb: _Problem, st: _State) -> float:
    """Set G = ∂L/∂(ASB) from the current residual and return the proxy loss."""
    torch.mul(st.E, pb.hw2, out=st.G)
    return 0.5 * float(torch.dot(st.G.view(-1), st.E.view(-1)))


def _gradients(st: _State) -> tuple[Tensor, Tensor]:
    """Return ∂L/∂A and ∂L/∂B (blocks); fill st.dS = ∂L/∂S and st.gS = its on-mask part."""
    nob, b, _ = st.A.shape
    Do = st.S.shape[0]
    dB = torch.bmm(st.P.view(Do, -1, b).permute(1, 2, 0), st.G)
    torch.bmm(st.G, st.B.transpose(1, 2), out=st.dP.view(Do, -1, b).transpose(0, 1))
    dPj = st.dP.view(nob, b, -1)
    dA = torch.bmm(dPj, st.S.view(nob, b, -1).transpose(1, 2))
    torch.bmm(st.A.transpose(1, 2), dPj, out=st.dS.view(nob, b, -1))
    torch.mul(st.dS, st.keep, out=st.gS)
    return dA, dB


def _sample_groups(pb: _Problem, dS: Tensor, gen: torch.Generator) -> Tensor:
    """One group index per tile, drawn ∝ the L1 norm of ∂L/∂S over the group; overwrites dS with |dS|."""
    b, m = pb.b, pb.m
    Do, Di = dS.shape
    g = dS.abs_().view(Do // b, b, Di // b, b // m, m)
    w = g[..., 0] + g[..., 1]
    for k in range(2, m):         # explicit adds: torch's reduction over a size-m inner dim is slow
        w += g[..., k]
    w = w.permute(2, 0, 1, 3).reshape(pb.valid.shape)
    if pb.padded:
        w *= pb.valid
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, pb.valid)   # a perfectly fitted tile: uniform
    cdf = w.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _spd_solve(Q: Tensor, rhs: Tensor) -> Tensor:
    """Solve batched small SPD systems Q x = rhs by unpivoted elimination (n ≤ m is tiny)."""
    Q, x = Q.clone(), rhs.clone()
    n = Q.shape[-1]
    for k in range(n):
        for i in range(k + 1, n):
            f = Q[..., i, k] / Q[..., k, k]
            Q[..., i, k:] -= f[..., None] * Q[..., k, k:]
            x[..., i] -= f * x[..., k]
    for k in reversed(range(n)):
        x[..., k] = (x[..., k] - (Q[..., k, k + 1:] * x[..., k + 1:]).sum(-1)) / Q[..., k, k]
    return x


def _best_support(pb: _Problem, M: Tensor, f: Tensor, alpha: Tensor, s_cur: Tensor) -> tuple[Tensor, Tensor]:
    """Minimise 2 sᵀf + α sᵀMs over the n-of-m supports; keep s_cur unless strictly beaten."""
    idx = pb.combos
    Q = alpha[:, None, None, None] * M[:, idx[:, :, None], idx[:, None, :]]       # [t, C, n, n]
    fc = f[:, idx]                                                               # [t, C, n]
    diag = Q.diagonal(dim1=-2, dim2=-1)
    ridge = _DAMP * diag.mean(-1, keepdim=True) + torch.finfo(Q.dtype).tiny
    s = _spd_solve(Q + torch.diag_embed(ridge.expand_as(diag)), -fc)
    cost = 2 * (s * fc).sum(-1) + (s[..., None, :] @ Q @ s[..., :, None])[..., 0, 0]
    cost = torch.nan_to_num(cost, nan=float("inf"))
    now = 2 * (s_cur * f).sum(-1) + alpha * (s_cur[:, None, :] @ M @ s_cur[:, :, None])[:, 0, 0]
    best_cost, best = cost.min(-1)
    take = best_cost < now
    t = torch.arange(len(best), device=f.device)
    s_new = torch.zeros_like(s_cur).scatter_(1, idx[best], s[t, best])
    sup_new = torch.zeros_like(s_cur, dtype=torch.bool).scatter_(1, idx[best], True)
    return torch.where(take[:, None], s_new, s_cur), take[:, None] & sup_new


def _support_step(pb: _Problem, st: _State, gen: torch.Generator) -> None:
    """Re-choose the support of one sampled group per tile, all tiles at once; updates S, mask, P, E.

    Groups are sampled from st.dS (the gradient of the last _gradients call, consumed here)."""
    b, m = pb.b, pb.m
    nob, nib = st.A.shape[0], st.B.shape[0]
    Do, Di = st.S.shape
    sel = _sample_groups(pb, st.dS, gen)
    tk = torch.arange(nib, device=sel.device).repeat_interleave(nob)
    tj = torch.arange(nob, device=sel.device).repeat(nib)
    r, q = sel // (b // m), sel % (b // m)
    row, grp = tj * b + r, tk * (b // m) + q
    cols = q[:, None] * m + torch.arange(m, device=sel.device)                  # within the block
    a = st.A[tj, :, r]                                                           # [t, b]: A's column
    Bg = st.B[tk[:, None], cols, :]                                              # [t, m, b]: B's rows
    BgH = Bg * pb.hw.view(nib, b)[tk][:, None, :]
    M = BgH @ Bg.transpose(1, 2)
    alpha = (a * a).sum(-1)
    Et = st.E.view(-1, b, b)
    u = torch.bmm(a[:, None, :], Et)[:, 0]                                       # aᵀE per tile
    S3, keep3 = st.S.view(Do, Di // m, m), st.keep.view(Do, Di // m, m)
    s_cur = S3[row, grp]
    # ∂/∂s of the tile loss at s = 0 with this group removed from the residual
    f = (BgH @ u[:, :, None])[..., 0] - alpha[:, None] * (M @ s_cur[:, :, None])[..., 0]
    s_new, sup = _best_support(pb, M, f, alpha, s_cur)
    unchanged = ~sup.any(-1, keepdim=True)
    keep3[row, grp] = torch.where(unchanged, keep3[row, grp], sup.float())
    S3[row, grp] = s_new
    ds = s_new - s_cur
    rows = torch.arange(b, device=sel.device)[None, :]
    st.P.view(nob, b, Di // m, m).index_put_((tj[:, None], rows, grp[:, None]), a[:, :, None] * ds[:, None, :],
                                             accumulate=True)
    dy = torch.bmm(ds[:, None, :], Bg)                                           # E += a·dy per tile
    Et.addcmul_(a[:, :, None], dy)


def _fold(pb: _Problem, best: _Snapshot, losses: list[float], seconds: float) -> ArmorResult:
    """Fold the row norms into A and the column norms into B; crop the core and mask."""
    out_f, in_f = pb.shape
    b = pb.b
    r = torch.ones(best.A.shape[0] * b, device=best.A.device)
    r[:out_f] = pb.r
    c = torch.ones(best.B.shape[0] * b, device=best.B.device)
    c[:in_f] = pb.c
    post = best.A * r.view(-1, b, 1)
    pre = best.B * c.view(-1, 1, b)
    return ArmorResult(post, best.S[:out_f, :in_f].clone(), best.keep[:out_f, :in_f] > 0, pre,
                       losses, seconds)
