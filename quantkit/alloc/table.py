"""The cost table every allocator reads, and the one definition of the bit budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.types import QSpec


@dataclass
class CostTable:
    """cost[l, o]: sensitivity of layer l at option o; size[l, o]: its stored bits."""
    layers: list[str]
    options: list[QSpec]
    cost: Tensor        # [L, O] float64
    size: Tensor        # [L, O] float64, bits (codes + scales + zeros + g_idx)
    weights: Tensor     # [L] number of weights of each layer

    def budget_bits(self, bits_per_weight: float) -> float:
        """Total stored bits allowed by an average of `bits_per_weight` over all layers."""
        return bits_per_weight * float(self.weights.sum())

    def bits_per_weight(self, choice: Tensor) -> float:
        """Effective bits per weight of a choice [L] of option indices."""
        return float(self.size.gather(1, choice[:, None]).sum() / self.weights.sum())

    def check_feasible(self, bits_per_weight: float) -> None:
        """Clear error naming the feasible range when the budget cannot be met."""
        w = self.weights.sum()
        check_budget(bits_per_weight, float(self.size.min(1).values.sum() / w),
                     float(self.size.max(1).values.sum() / w))

    def as_plan(self, choice: Tensor) -> dict[str, QSpec]:
        return {name: self.options[int(o)] for name, o in zip(self.layers, choice)}


def check_budget(bits_per_weight: float, lo: float, hi: float) -> None:
    """The error for a budget below the smallest options everywhere (lo), naming the range."""
    if bits_per_weight < lo - 1e-9:
        raise QuantkitError(f"budget of {bits_per_weight} bits per weight is infeasible: the "
                            f"smallest feasible budget with these options is {lo:.4f} and the "
                            f"largest useful one {hi:.4f}; raise --bits or add smaller --bit-options")


def tie(table: CostTable, groups: list[list[str]]) -> tuple[CostTable, Tensor]:
    """One row per group of layers that must share an option (costs and sizes add up);
    also returns each layer's row, so that `choice[rows]` expands a tied choice."""
    index = {n: i for i, n in enumerate(table.layers)}
    rows = torch.empty(len(table.layers), dtype=torch.long)
    for g, members in enumerate(groups):
        rows[[index[m] for m in members]] = g
    def add(t: Tensor) -> Tensor:
        return torch.zeros((len(groups), *t.shape[1:]), dtype=t.dtype).index_add_(0, rows, t)
    return CostTable(["+".join(m) for m in groups], table.options, add(table.cost), add(table.size),
                     add(table.weights)), rows


def repair(table: CostTable, choice: Tensor, bits_per_weight: float) -> Tensor:
    """Greedy fix of a rounded choice: cheapest downgrades until it fits, then best upgrades that fit."""
    budget = table.budget_bits(bits_per_weight) + 1e-6
    order = torch.argsort(table.size, dim=1)           # options of each layer, smallest first
    size, cost = table.size.gather(1, order), table.cost.gather(1, order)
    pos = torch.argsort(order, dim=1).gather(1, choice[:, None]).squeeze(1).clone()
    rows = torch.arange(len(pos))
    top = size.shape[1] - 1
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    used = float(size[rows, pos].sum())

    def step(to: Tensor) -> tuple[Tensor, Tensor]:
        return cost[rows, to] - cost[rows, pos], size[rows, to] - size[rows, pos]

    while used > budget:
        dc, ds = step((pos - 1).clamp(min=0))
        l = int(torch.where(pos > 0, dc / (-ds).clamp(min=1e-12), inf).argmin())
        used += float(ds[l])
        pos[l] -= 1
    while True:
        dc, ds = step((pos + 1).clamp(max=top))
        ok = (pos < top) & (used + ds <= budget) & (dc < 0)
        if not ok.any():
            break
        l = int(torch.where(ok, dc / ds.clamp(min=1e-12), inf).argmin())
        used += float(ds[l])
        pos[l] += 1
    return order.gather(1, pos[:, None]).squeeze(1)


def total(table: CostTable, choice: Tensor) -> tuple[float, float]:
    """(cost, size) of a choice [L] of option indices."""
    idx = choice[:, None].long()
    return float(table.cost.gather(1, idx).sum()), float(table.size.gather(1, idx).sum())


def as_table(cost, size, weights=None, layers=None, options=None) -> CostTable:
    """A CostTable from plain arrays (tests, benches): defaults name layers and options by index."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    size = torch.as_tensor(size, dtype=torch.float64)
    L, O = cost.shape
    return CostTable(layers or [f"l{i}" for i in range(L)],
                     options or [QSpec(bits=b) for b in (2, 3, 4, 8)[:O]] + [QSpec()] * max(0, O - 4),
                     cost, size, torch.ones(L, dtype=torch.float64) if weights is None
                     else torch.as_tensor(weights, dtype=torch.float64))
