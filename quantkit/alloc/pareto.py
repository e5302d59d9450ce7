"""ZeroQ's Pareto frontier: exact multiple-choice knapsack by dynamic programming on a size grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.alloc.table import CostTable, repair
from quantkit.registry import register


@dataclass
class Frontier:
    """Least cost within every grid capacity; choices are recovered on demand."""
    unit: float          # bits per grid step
    cost: Tensor         # [C+1] non-increasing: least cost using at most c units
    at: Tensor           # [C+1] the exact capacity where that cost is reached
    arg: Tensor          # [L, C+1] option chosen for layer l when l..0 fill exactly c units
    units: Tensor        # [L, O] option sizes in grid units

    def choice(self, c: int | None = None) -> Tensor:
        """Option per layer of the frontier point for capacity c (default: the largest)."""
        c = int(self.at[-1 if c is None else c])
        out = torch.zeros(self.arg.shape[0], dtype=torch.long)
        for l in range(self.arg.shape[0] - 1, -1, -1):
            out[l] = o = int(self.arg[l, c])
            c -= int(self.units[l, o])
        return out


def frontier(table: CostTable, max_bits: float | None = None, steps: int = 20_000) -> Frontier:
    """Solve the multiple-choice knapsack for all capacities up to max_bits (default: all max).

    Sizes are rounded up to the grid (unit = the gcd of integer sizes when that keeps the
    grid small, else max_bits / steps), so every choice fits its capacity; on the gcd grid the
    solution is exact.
    """
    size = table.size
    cap_bits = float(size.max(1).values.sum()) if max_bits is None else max_bits
    unit = _unit(size, cap_bits, steps)
    units = torch.ceil(size / unit - 1e-9).long()
    C = int(cap_bits / unit + 1e-9)
    L, O = units.shape
    best = torch.full((C + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    arg = torch.zeros(L, C + 1, dtype=torch.int8)
    for l in range(L):
        cand = torch.full((O, C + 1), float("inf"), dtype=torch.float64)
        for o in range(O):
            u = int(units[l, o])
            if u <= C:
                cand[o, u:] = best[:C + 1 - u] + table.cost[l, o]
        best, a = cand.min(0)
        arg[l] = a.to(torch.int8)
    cost, at = torch.cummin(best, 0)
    return Frontier(unit, cost, at, arg, units)


def _unit(size: Tensor, cap_bits: float, steps: int) -> float:
    if torch.all(size == size.round()):
        g = 0
        for v in size.flatten().long().tolist():
            g = _gcd(g, v)
        if g and cap_bits / g <= steps:
            return float(g)
    return cap_bits / steps


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@register("allocator", "pareto")
def pareto_allocate(table: CostTable, bits_per_weight: float) -> Tensor:
    """The frontier's point for the budget, then upgrades into what grid rounding left over.

    Sizes rounded up to the grid can strand up to one unit per layer of the budget; the exact
    greedy fill spends it (cost only goes down; on a gcd grid nothing is left to spend).
    """
    table.check_feasible(bits_per_weight)
    return repair(table, frontier(table, table.budget_bits(bits_per_weight)).choice(),
                  bits_per_weight)
