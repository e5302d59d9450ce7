"""BAQ's closed-form bit allocation at layer level, with rounding repaired to the exact budget.

Continuous problem (BAQ, KKT of an exponential rate-loss model):
    min Σ_l L_l 2^(-θ (R_l - R_ref))   s.t.   Σ_l n_l R_l = n · R
gives R_l = R + (a_l - ā)/θ with a_l = log2(L_l / n_l) and ā the n-weighted mean of a: every
layer's predicted loss per weight is equal (the equal-loss structure). The per-column
variant inside GPTQ is the same formula with n_l = 1.
"""
from __future__ import annotations


import torch
from torch import Tensor

from quantkit.alloc.table import CostTable
from quantkit.registry import register

THETA = 1.95  # BAQ's fitted exponent (theory: 2)


def baq_rates(loss: Tensor, n: Tensor, rate: float, theta: float = THETA) -> Tensor:
    """Continuous optimum R_l (bits per weight) for reference losses L_l and layer sizes n_l."""
    a = torch.log2(loss.clamp(min=1e-30) / n)
    return rate + (a - (n * a).sum() / n.sum()) / theta


def _reference_option(table: CostTable, bits_per_weight: float) -> int:
    bpw = (table.size / table.weights[:, None]).mean(0)
    return int((bpw - bits_per_weight).abs().argmin())


def repair(table: CostTable, choice: Tensor, bits_per_weight: float) -> Tensor:
    """Greedy fix of a rounded choice: cheapest downgrades until it fits, then best upgrades that fit."""
    budget = table.budget_bits(bits_per_weight)
    order = torch.argsort(table.size, dim=1)           # options of each layer, smallest first
    rank = torch.argsort(order, dim=1)
    pos = rank.gather(1, choice[:, None]).squeeze(1).clone()
    L, O = table.size.shape
    used = float(table.size.gather(1, choice[:, None]).sum())

    def step(l: int, d: int) -> tuple[float, float]:
        a, b = int(order[l, pos[l]]), int(order[l, pos[l] + d])
        return float(table.cost[l, b] - table.cost[l, a]), float(table.size[l, b] - table.size[l, a])

    while used > budget + 1e-6:
        cands = [(dc / max(-ds, 1e-12), l) for l in range(L) if pos[l] > 0
                 for dc, ds in [step(l, -1)]]
        _, l = min(cands)
        used += step(l, -1)[1]
        pos[l] -= 1
    while True:
        cands = [(dc / max(ds, 1e-12), l) for l in range(L) if pos[l] < O - 1
                 for dc, ds in [step(l, 1)] if used + ds <= budget + 1e-6 and dc < 0]
        if not cands:
            break
        _, l = min(cands)
        used += step(l, 1)[1]
        pos[l] += 1
    return order.gather(1, pos[:, None]).squeeze(1)


@register("allocator", "baq")
def baq_allocate(table: CostTable, bits_per_weight: float, theta: float = THETA) -> Tensor:
    """Closed-form rates from the losses at the option nearest the budget, rounded, repaired."""
    table.check_feasible(bits_per_weight)
    ref = _reference_option(table, bits_per_weight)
    rates = baq_rates(table.cost[:, ref], table.weights, bits_per_weight, theta)
    bpw = table.size / table.weights[:, None]
    choice = (bpw - rates[:, None]).abs().argmin(1)
    return repair(table, choice, bits_per_weight)


def predicted_losses(loss: Tensor, rates: Tensor, ref_rate: float, theta: float = THETA) -> Tensor:
    """The rate-loss model's loss of each layer at `rates` (equal per weight at the optimum)."""
    return loss * torch.pow(2.0, -theta * (rates - ref_rate))


