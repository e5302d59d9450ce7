"""The registered pruners: magnitude, Wanda, SparseGPT and ARMOR, N:M along the input dimension.

A pruner is `fn(W, stats, spec, n=2, m=4, **options) -> PackedLinear` in the "sparse" format:
spec None keeps the kept weights in fp16; a QSpec quantizes them on its grid by GPTQ with the
mask held fixed (error feedback through the kept weights only; RTN when there is no Hessian).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.formats.sparse import block_diag_apply, make_sparse, make_sparse_int
from quantkit.prune.armor import armor_factorize
from quantkit.prune.mask import check_width, nm_mask, parse_pattern
from quantkit.quant.base import LayerStats, QSpec, proxy_loss
from quantkit.quant.gptq import gptq_codes
from quantkit.registry import register

PRUNE_ONLY = QSpec(bits=4, group_size=-1, act_order=False)   # damping for pruning without rounding


def _hessian(W: Tensor, stats: LayerStats | None) -> Tensor:
    return torch.eye(W.shape[1], device=W.device) if stats is None else stats.H


def _check_groups(spec: QSpec | None, n: int, m: int) -> None:
    if spec is not None and spec.group_size > 0 and spec.group_size % m:
        raise QuantkitError(f"--group-size {spec.group_size} must be a multiple of {m} for {n}:{m} sparsity")


def _pack(W: Tensor, keep: Tensor, H: Tensor, spec: QSpec | None, n: int, m: int,
          pre: Tensor | None = None, post: Tensor | None = None, feedback: bool = False,
          choose: bool = False) -> PackedLinear:
    """fp16 kept weights (spec None; with feedback, updated by the pruning error fed back
    through H), or GPTQ codes on spec's grid with the mask fixed. choose: the mask is not
    given but picked group by group by SparseGPT's rule (from keep, all False)."""
    _check_groups(spec, n, m)
    if spec is None and not feedback:
        return make_sparse(W * keep, keep, n, m, pre=pre, post=post)
    base = replace(PRUNE_ONLY if spec is None else spec, act_order=False)
    vals, scales, zeros, _, _, keep = gptq_codes(W, H, base, keep=keep, nm=(n, m) if choose else None,
                                                 round_values=spec is not None)
    if spec is None:
        return make_sparse(vals, keep, n, m, pre=pre, post=post)
    return make_sparse_int(vals, keep, scales, None if spec.sym else zeros, spec.bits,
                           spec.group_size, n, m, pre=pre, post=post)


def _check(recipe) -> None:
    """What every pruner needs of the recipe (checked before anything is loaded)."""
    parse_pattern(recipe.pattern)
    if recipe.alloc != "uniform":
        raise QuantkitError("--prune with mixed precision (--alloc) is not supported: prune with one --bits")
    if recipe.method != "gptq":
        raise QuantkitError(f"--prune {recipe.prune} --method {recipe.method}: the kept weights of a "
                            "pruned model are quantized by GPTQ with the mask fixed; use --method gptq")


def _pattern(recipe) -> dict:
    n, m = parse_pattern(recipe.pattern)
    return {"n": n, "m": m}


PRUNER = {"check": _check, "options": _pattern}


@register("pruner", "magnitude", **PRUNER)
def magnitude(W: Tensor, stats: LayerStats | None, spec: QSpec | None, n: int = 2, m: int = 4) -> PackedLinear:
    """Keep the n largest |w| of every m: no data, no weight update."""
    return _pack(W, nm_mask(W.abs(), n, m), _hessian(W, stats), spec, n, m)


@register("pruner", "wanda", **PRUNER)
def wanda(W: Tensor, stats: LayerStats | None, spec: QSpec | None, n: int = 2, m: int = 4) -> PackedLinear:
    """Wanda (Sun et al.): keep the n largest |w_ij|·‖x_j‖₂ of every m; no weight update."""
    if stats is None:
        raise QuantkitError("Wanda needs calibration statistics (input norms)")
    return _pack(W, nm_mask(W.abs() * stats.H.diagonal().sqrt(), n, m), stats.H, spec, n, m)


@register("pruner", "sparsegpt", **PRUNER)
def sparsegpt(W: Tensor, stats: LayerStats | None, spec: QSpec | None, n: int = 2, m: int = 4) -> PackedLinear:
    """SparseGPT: masks chosen group by group on the OBS score, pruning error fed back (GPTQ's loop)."""
    if stats is None:
        raise QuantkitError("SparseGPT needs calibration statistics (a Hessian)")
    check_width(W.shape[1], m)
    return _pack(W, torch.zeros_like(W, dtype=torch.bool), stats.H, spec, n, m, feedback=True, choose=True)


def _block_inverse(blocks: Tensor, d: int) -> Tensor:
    """Inverses of padded diagonal blocks (the padding made identity, so it stays padding)."""
    b = blocks.shape[-1]
    full = blocks.clone()
    r = d - (blocks.shape[0] - 1) * b
    if r < b:
        full[-1, r:, :] = 0
        full[-1, :, r:] = 0
        full[-1, r:, r:] = torch.eye(b - r, device=blocks.device, dtype=blocks.dtype)
    return torch.linalg.inv(full)


@dataclass
class ArmorConfig:
    """The recipe's `armor:` section: W ≈ A·S·B, A and B block-diagonal around an N:M-sparse S."""
    block_size: int = 32            # wrapper blocks (the reference yaml's default; its paper runs: 128)
    iters: int = 3000               # block coordinate descent iterations per layer (reference yaml: 3000)
    lr: float = 1e-4                # Adam step on A, B and the kept values
    init: str = "nowag"             # starting mask: nowag (the paper's) | magnitude | wanda | sparsegpt
    refit: bool = True              # also solve the kept values on the full Hessian; keep what is better
    seed: int = 0


@register("pruner", "armor", section="armor", config=ArmorConfig, check=_check,
          options=lambda recipe: {**_pattern(recipe), **asdict(recipe.section("armor", ArmorConfig))})
def armor(W: Tensor, stats: LayerStats | None, spec: QSpec | None, n: int = 2, m: int = 4,
          block_size: int = 32, iters: int = 3000, lr: float = 1e-4, init: str = "nowag",
          seed: int = 0, refit: bool = True) -> PackedLinear:
    """ARMOR: W ≈ A·S·B, S N:M-sparse, A and B block-diagonal, by block coordinate descent on
    the diagonal-Hessian proxy (prune/armor.py).

    init: the starting mask, "nowag" (the paper's) or a baseline's ("magnitude", "wanda",
    "sparsegpt"). refit: with A and B fixed, the kept values are also solved against the full
    Hessian (S's inputs are B x, its target A⁻¹ W B⁻¹, error fed back through the kept weights
    as SparseGPT does); the result is kept only where it lowers tr(E H Eᵀ) of the whole layer.
    Quantized (spec given), the core is rounded the same way, GPTQ with the mask fixed.
    Started from a baseline, the baseline's own layer (no wrappers) is a candidate too: the
    fit lowers ARMOR's diagonal proxy, not always tr(E H Eᵀ), and the layer keeps the lower one.
    """
    if stats is None:
        raise QuantkitError("ARMOR needs calibration statistics (input second moments)")
    init_mask, packs = None, []
    if init != "nowag":
        if init not in ("magnitude", "wanda", "sparsegpt"):
            raise QuantkitError(f"armor init {init!r}: choose nowag, magnitude, wanda or sparsegpt")
        baseline = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}[init]
        base = baseline(W, stats, None, n, m)
        init_mask = base.dequantize() != 0
        packs.append(base if spec is None else baseline(W, stats, spec, n, m))
    r = armor_factorize(W, stats.H.diagonal(), n, m, block_size, iters, lr, init_mask, seed)
    pre, post = r.pre.half().float(), r.post.half().float()      # what the checkpoint stores
    Hz = block_diag_apply(pre.transpose(1, 2), block_diag_apply(pre, stats.H, "left"), "right")
    packs.append(_pack(r.core, r.mask, Hz, spec, n, m, pre, post))
    if refit:
        T = block_diag_apply(_block_inverse(post, W.shape[0]), W, "left")
        T = block_diag_apply(_block_inverse(pre, W.shape[1]), T, "right")
        packs.append(_pack(T, r.mask, Hz, spec, n, m, pre, post, feedback=True))
    return min(packs, key=lambda p: proxy_loss(W - p.dequantize(), stats.H))
