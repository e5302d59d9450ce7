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

from quantkit.alloc.table import CostTable, repair
from quantkit.formats.packed import levels_storage_bits
from quantkit.registry import register

THETA = 1.95  # BAQ's fitted exponent (theory: 2)


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




def _level_menu(out_features: int, max_levels: int = 256) -> tuple[list[int], list[int]]:
    """Level counts worth storing (most levels for their radix-packed size) and their bits."""
    menu, cost = [1], [0]
    for m in range(2, max_levels + 1):
        c = levels_storage_bits(out_features, [m])
        if c == cost[-1]:
            menu[-1] = m
        else:
            menu.append(m)
            cost.append(c)
    return menu, cost


def column_levels(loss: Tensor, out_features: int, bits: int, budget: int,
                  theta: float = THETA) -> Tensor:
    """BAQ inside a layer: level count per input column from its GPTQ loss at `bits`.

    Continuous rates R_j = bits + (log2 L_j - mean log2 L)/θ, rounded to the nearest storable
    level count, then repaired greedily on the rate-loss model L_j (2^bits / m)^θ until the
    packed codes fit `budget` bits and no further upgrade fits. Dead columns (L_j = 0) get 1.
    """
    menu, cost = _level_menu(out_features)
    menu_t = torch.tensor(menu, dtype=torch.float64)
    cost_t = torch.tensor(cost, dtype=torch.float64)
    L = loss.double().clamp(min=0)
    live = L > 0
    a = torch.log2(L.clamp(min=1e-300))
    rates = bits + (a - a[live].mean()) / theta if live.any() else torch.zeros_like(a)
    pos = (torch.log2(menu_t)[None] - rates[:, None]).abs().argmin(1)
    pos[~live] = 0

    def model(p: Tensor) -> Tensor:
        return torch.where(live, L * torch.pow(2.0 ** bits / menu_t[p], theta), 0.0)

    used = float(cost_t[pos].sum())
    top = len(menu) - 1
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    while used > budget:
        down = pos.clamp(min=1) - 1
        ratio = (model(down) - model(pos)) / (cost_t[pos] - cost_t[down])
        j = int(torch.where(pos > 0, ratio, inf).argmin())
        used -= float(cost_t[pos[j]] - cost_t[pos[j] - 1])
        pos[j] -= 1
    while True:
        up = (pos + 1).clamp(max=top)
        dc = cost_t[up] - cost_t[pos]
        gain = (model(pos) - model(up)) / dc.clamp(min=1)
        ok = (pos < top) & (used + dc <= budget) & live & (gain > 0)
        if not ok.any():
            break
        j = int(torch.where(ok, gain, -inf).argmax())
        used += float(dc[j])
        pos[j] += 1
    return torch.tensor([menu[p] for p in pos.tolist()], dtype=torch.int64)
