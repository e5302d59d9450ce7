"""BAQ's closed-form bit allocation at layer level, with rounding repaired to the exact budget.

Continuous problem (BAQ, KKT of an exponential rate-loss model):
    min Σ_l L_l 2^(-θ (R_l - R_ref))   s.t.   Σ_l n_l R_l = n · R
gives R_l = R + (a_l - ā)/θ with a_l = log2(L_l / n_l) and ā the n-weighted mean of a: every
layer's predicted loss per weight is equal (the equal-loss structure). The per-column
variant inside GPTQ is the same formula with n_l = 1 (quant/levels.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.alloc.table import CostTable, repair
from quantkit.quant.levels import THETA
from quantkit.registry import register


def baq_rates(loss: Tensor, n: Tensor, rate: float, theta: float = THETA) -> Tensor:
    """Continuous optimum R_l (bits per weight) for reference losses L_l and layer sizes n_l."""
    a = torch.log2(loss.clamp(min=1e-30) / n)
    return rate + (a - (n * a).sum() / n.sum()) / theta


def _reference_option(table: CostTable, bits_per_weight: float) -> int:
    bpw = (table.size / table.weights[:, None]).mean(0)
    return int((bpw - bits_per_weight).abs().argmin())


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
