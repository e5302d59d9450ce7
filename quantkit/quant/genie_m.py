"""Genie-M: block-wise reconstruction of a quantized image model on real or synthetic images.

Per unit (residual / inverted-residual block), weights get soft rounding and a learned step:
W_q = s·(clamp(⌊W/s₀⌋ + h(V) + z, 0, 2ᵇ−1) − z), h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1), the integer
base ⌊W/s₀⌋ frozen at init while s is learned (what sets Genie-M apart from AdaRound).
Activations use LSQ step sizes; QDrop mixes quantized and full-precision values (p = 0.5) at the
unit's input and at every activation quantizer. The loss is the unit's output error against the
full-precision model plus the annealed rounding regulariser Σ 1 − |2h−1|^β.

The weight step is learned as s = s₀·exp(u): Adam moves u by about lr a step, a relative change of
the step the same at every bit width (an absolute lr of 1e-4 is 0.3% of a typical 4-bit step
and 5% of an 8-bit one: Lite0 W8A8 fell from 93.8% to 58.6% top-1 agreement that way).
A share of the calibration images (`holdout`) is kept out of each unit's training; every
`check_every` iterations, and before the first, the unit's hard-rounded output error on them is
measured and the best state is the one kept (on few synthetic images, 100 iterations made Lite0
W4A4 worse than its start: 23.8% against 46.9%).

start "gptq" (the default; the paper's start is "nearest"): the grid (s₀, zero) and the side of
each weight's rounding come from GPTQ on the unit's inputs; h(V) starts on GPTQ's side (clipped
to ⌊W/s₀⌋ or ⌊W/s₀⌋+1), as far from ½ as the weight's own fraction, so hard rounding before any
iteration gives GPTQ's codes wherever GPTQ stays within one step of the weight. For short CPU
budgets, where a nearest-rounding start has no time to move (README: Lite0 W4A4).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, int_parts, make_int
from quantkit.model.convnet import unit_layers
from quantkit.quant.act import ActQuantizer, attach_input_quantizers
from quantkit.quant.convnet import ConvPlan, calibrate_activations, compress_layer, layer_hessians, run_batches
from quantkit.quant.gptq import gptq as gptq_compress
from quantkit.registry import register

GAMMA, ZETA = -0.1, 1.1


@dataclass
class GenieMConfig:
    iterations: int = 1000          # per unit; the reference runs 20k on a GPU
    batch_size: int = 32
    reg_weight: float = 1.0         # Genie's rounding-regulariser weight (BRECQ/QDrop: 0.01)
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2             # fraction of iterations without the regulariser
    lr_round: float = 1e-3
    lr_log_step: float = 3e-3       # on u in s = s₀·exp(u): relative, the same at any bit width
    lr_act_scale: float = 4e-5
    drop_prob: float = 0.5          # QDrop
    scale_p: float = 2.4            # s₀: the clip ratio minimising Σ |w − q(w)|^p per channel
    start: str = "gptq"             # gptq: grid and rounding sides from GPTQ | nearest (the paper)
    holdout: float = 0.25           # share of the images that picks each unit's state, not trained on
    check_every: int = 10           # iterations between two measurements on the held-out images


def init_scale(W: Tensor, bits: int, p: float = 2.4, grid: int = 100) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric (scale [out], zero [out]) over clip ratios of the row's range,
    minimising Σ |w − q(w)|^p."""
    qmax = 2 ** bits - 1
    lo, hi = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    best_s, best_z = None, None
    best = torch.full((W.shape[0],), float("inf"))
    for r in torch.linspace(1.0, 0.2, grid):
        s = ((hi - lo) * r / qmax).clamp_min(1e-8)
        z = torch.round(-lo * r / s)
        q = (torch.clamp(torch.round(W / s[:, None]) + z[:, None], 0, qmax) - z[:, None]) * s[:, None]
        err = (W - q).abs().pow(p).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = s.clone() if best_s is None else torch.where(better, s, best_s)
        best_z = z.clone() if best_z is None else torch.where(better, z, best_z)
    return best_s, best_z


class SoftWeight(nn.Module):
    """The soft-rounded weight of one layer, with its frozen integer base and learned step."""

    def __init__(self, W: Tensor, bits: int, p: float, start: PackedLinear | None = None):
        super().__init__()
        self.shape, self.bits = W.shape, bits
        W2 = W.reshape(W.shape[0], -1).float()
        if start is None:
            s0, z = init_scale(W2, bits, p)
        else:                                    # start's grid (per channel: one group)
            codes, scales, zeros, _ = int_parts(start)
            s0, z = scales[:, 0], zeros[:, 0]
        self.register_buffer("base", torch.floor(W2 / s0[:, None]))
        self.register_buffer("zero", z[:, None])
        rest = W2 / s0[:, None] - self.base
        if start is not None:                    # on start's side of ½, as far from it as rest
            far = torch.maximum(rest, 1 - rest)
            rest = torch.where(codes.float() - self.zero - self.base >= 1, far, 1 - far)
        rest = rest.clamp(1e-4, 1 - 1e-4)        # h(V) = rest at init
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.register_buffer("step0", s0[:, None].clone())
        self.log_step = nn.Parameter(torch.zeros_like(self.step0))

    @property
    def scale(self) -> Tensor:
        return self.step0 * torch.exp(self.log_step)

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self, hard: bool) -> Tensor:
        r = (self.V >= 0).float() if hard else self.h()
        return torch.clamp(self.base + r + self.zero, 0, 2 ** self.bits - 1)

    def forward(self, hard: bool = False) -> Tensor:
        return (self.scale * (self.codes(hard) - self.zero)).reshape(self.shape)

    def regulariser(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def packed(self) -> PackedLinear:
        """The hard-rounded codes, stored per output channel."""
        return make_int(self.codes(True).to(torch.int32), self.scale.detach(),
                        self.zero.to(torch.int64), self.bits, -1)


def _set_weight(mod: nn.Module, w: Tensor) -> None:
    """Put a plain tensor (part of the autograd graph) where the layer reads its weight."""
    if "weight" in mod._parameters:
        del mod._parameters["weight"]
    mod.weight = w


def capture(model: nn.Module, unit: nn.Module, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(inputs, outputs) of `unit` over all batches (its first positional argument)."""
    ins, outs = [], []

    def hook(_m, args, out):
        ins.append(args[0].detach())
        outs.append((out[0] if isinstance(out, tuple) else out).detach())
    run_batches(model, batches, stop_after=unit, hooks={unit: hook})
    return torch.cat(ins), torch.cat(outs)


def _rec_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels, averaged over samples and positions."""
    return (pred - target).pow(2).sum(1).mean()


@torch.no_grad()
def output_error(unit: nn.Module, x: Tensor, y: Tensor, chunk: int) -> float:
    """_rec_loss of unit(x) against y over all samples, run `chunk` samples at a time."""
    total = 0.0
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        out = unit(xc)
        total += float(_rec_loss(out[0] if isinstance(out, tuple) else out, yc)) * len(xc)
    return total / len(x)


def gptq_starts(model: nn.Module, layers: dict[str, nn.Module], plan: ConvPlan,
                batches: list[Tensor], stop_after: nn.Module | None) -> dict[str, PackedLinear]:
    """GPTQ of each layer on the Hessian of the inputs it gets now (as quantize_convnet does);
    the layers keep their unquantized weights."""
    stats = layer_hessians(model, list(layers), batches, stop_after)
    return {n: compress_layer(m, gptq_compress, stats[n], plan.weights[n], write=False)
            for n, m in layers.items()}


def _split(n: int, share: float, iterations: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(trained, held-out) sample indices: round(share·n) held out, at least 2 kept for training;
    none held out when nothing is trained."""
    perm = torch.randperm(n, generator=gen)
    k = max(0, min(round(share * n), n - 2)) if iterations > 0 else 0
    return perm[k:], perm[:k]


def reconstruct_unit(unit: nn.Module, layers: dict[str, nn.Module], bits: dict[str, int],
                     quantizers: list[ActQuantizer], x_q: Tensor, x_fp: Tensor, y: Tensor,
                     cfg: GenieMConfig, gen: torch.Generator, bar=None,
                     starts: dict[str, PackedLinear] | None = None) -> tuple[dict[str, PackedLinear], int]:
    """Optimise the unit's rounding, weight steps and activation steps on the trained share of the
    images; keep the state whose hard-rounded output error on the held-out share is lowest (the
    start included); harden. Returns (packed layers, the iteration of the state kept)."""
    starts = starts or {}
    soft = {n: SoftWeight(m.weight.detach(), bits[n], cfg.scale_p, starts.get(n))
            for n, m in layers.items()}
    rounding = [s.V for s in soft.values()]
    steps = [s.log_step for s in soft.values()]
    act_steps = [q.scale for q in quantizers]
    params = rounding + steps + act_steps        # what the kept state holds
    train, held = _split(len(x_q), cfg.holdout, cfg.iterations, gen)
    for q in quantizers:
        q.scale.requires_grad_(True)
    opt = torch.optim.Adam([{"params": rounding, "lr": cfg.lr_round},
                            {"params": steps, "lr": cfg.lr_log_step}])
    act_opt = torch.optim.Adam(act_steps, lr=cfg.lr_act_scale) if quantizers else None
    act_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, cfg.iterations, 0)
                 if act_opt else None)
    warm = int(cfg.warmup * cfg.iterations)

    best = (float("inf"), 0, None)               # (held-out error, iteration, parameter values)
    try:
        for it in range(cfg.iterations + 1):
            if len(held) and (it % cfg.check_every == 0 or it == cfg.iterations):
                for n, m in layers.items():
                    _set_weight(m, soft[n](hard=True))
                err = output_error(unit, x_q[held], y[held], cfg.batch_size)
                if err < best[0]:
                    best = (err, it, [p.detach().clone() for p in params])
            if it == cfg.iterations:
                break
            for q in quantizers:
                q.drop_prob = cfg.drop_prob
            idx = train[torch.randint(0, len(train), (min(cfg.batch_size, len(train)),), generator=gen)]
            xq, xf = x_q[idx], x_fp[idx]
            mix = torch.rand(xq.shape, generator=gen) < cfg.drop_prob
            for n, m in layers.items():
                _set_weight(m, soft[n]())
            out = unit(torch.where(mix, xf, xq))
            loss = _rec_loss(out[0] if isinstance(out, tuple) else out, y[idx])
            if it >= warm:
                t = (it - warm) / max(1, cfg.iterations - warm)
                beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * t))
                loss = loss + cfg.reg_weight * sum(s.regulariser(beta) for s in soft.values())
            opt.zero_grad(set_to_none=True)
            if act_opt:
                act_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if act_opt:
                act_opt.step()
                act_sched.step()
                for q in quantizers:
                    q.scale.data.clamp_(min=1e-8)
            for q in quantizers:
                q.drop_prob = 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4g}", kept=best[1], refresh=False)
    finally:
        for q in quantizers:
            q.scale.requires_grad_(False)
            q.drop_prob = 0.0
    kept = cfg.iterations if best[2] is None else best[1]
    packed = {}
    with torch.no_grad():
        for p, v in zip(params, best[2] or []):
            p.copy_(v)
        for n, m in layers.items():
            packed[n] = soft[n].packed()
            m.weight = nn.Parameter(packed[n].dequantize().reshape(soft[n].shape), requires_grad=False)
    return packed, kept


@register("reconstruction", "genie-m", section="genie_m", config=GenieMConfig)
def genie_m(model: nn.Module, plan: ConvPlan, batches: list[Tensor], config: GenieMConfig | None = None,
            seed: int = 0, progress: bool = True
            ) -> tuple[dict[str, PackedLinear], dict[str, ActQuantizer], dict]:
    """Genie-M over every unit of the plan, in execution order; `model` ends up quantized.
    Returns (packed layers, activation quantizers, {"kept_iteration": {unit: iteration}})."""
    cfg = config or GenieMConfig()
    if cfg.start not in ("nearest", "gptq"):
        raise QuantkitError(f"genie_m.start {cfg.start!r}: use nearest | gptq")
    if not 0 <= cfg.holdout < 1 or cfg.check_every < 1:
        raise QuantkitError(f"genie_m.holdout {cfg.holdout} / check_every {cfg.check_every}: "
                            "holdout is a share in [0, 1) (0: train on every image), check_every >= 1")
    gen = torch.Generator().manual_seed(seed)
    fp = copy.deepcopy(model)
    quantizers = attach_input_quantizers(model, {n: b for n, b in plan.acts.items() if b is not None})
    for p in model.parameters():
        p.requires_grad_(False)
    packed, kept = {}, {}
    units = plan.units or [""]
    bar = tqdm(total=len(units) * cfg.iterations, desc="genie-m", disable=not progress)
    with bar:
        for unit in units:
            names = [n for n in unit_layers(unit, plan.order) if n in plan.weights]
            mine = [quantizers[n] for n in names if n in quantizers]
            mod = model.get_submodule(unit) if unit else model
            if mine:
                calibrate_activations(model, {n: quantizers[n] for n in names if n in quantizers},
                                      batches, mod if unit else None)
            layers = {n: model.get_submodule(n) for n in names}
            starts = (gptq_starts(model, layers, plan, batches, mod if unit else None)
                      if cfg.start == "gptq" else None)
            x_q, _ = capture(model, mod, batches)
            x_fp, y = capture(fp, fp.get_submodule(unit) if unit else fp, batches)
            done, kept[unit] = reconstruct_unit(mod, layers, {n: plan.weights[n].bits for n in names},
                                                mine, x_q, x_fp, y, cfg, gen, bar, starts)
            packed.update(done)
    return packed, quantizers, {"kept_iteration": kept}

