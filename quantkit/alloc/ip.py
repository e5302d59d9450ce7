"""Bit allocation by integer programming (pulp + its bundled CBC solver)."""
from __future__ import annotations

import warnings

import pulp
import torch
from torch import Tensor

from quantkit.alloc.table import CostTable
from quantkit.errors import QuantkitError
from quantkit.registry import register


def _binary(prob: pulp.LpProblem, name: str):
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, cat="Binary")
    return pulp.LpVariable(name, cat="Binary")


@register("allocator", "ip")
def ip_allocate(table: CostTable, bits_per_weight: float, bops: Tensor | None = None,
                bops_budget: float | None = None) -> Tensor:
    """Option index per layer minimising Σ cost under the size budget.

    bops [L, O] with bops_budget: an optional second (compute) constraint. Layers that must
    share an option are merged into one row beforehand (alloc.table.tie), for every allocator.
    """
    table.check_feasible(bits_per_weight)
    L, O = table.cost.shape
    prob = pulp.LpProblem("bits", pulp.LpMinimize)
    x = [[_binary(prob, f"x_{l}_{o}") for o in range(O)] for l in range(L)]
    # costs are rescaled so that CBC's tolerances act on numbers of order one
    scale = float(table.cost.abs().max()) or 1.0
    prob += pulp.lpSum(float(table.cost[l, o]) / scale * x[l][o] for l in range(L) for o in range(O))
    for l in range(L):
        prob += pulp.lpSum(x[l]) == 1
    sscale = float(table.size.max())
    prob += pulp.lpSum(float(table.size[l, o]) / sscale * x[l][o] for l in range(L) for o in range(O)) \
        <= table.budget_bits(bits_per_weight) / sscale
    if bops is not None and bops_budget is not None:
        prob += pulp.lpSum(float(bops[l, o]) * x[l][o] for l in range(L) for o in range(O)) <= bops_budget
    with warnings.catch_warnings():  # pulp 3 announces API changes for its 4.0; CBC is bundled now
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9))
    if pulp.LpStatus[status] != "Optimal":
        raise QuantkitError(f"bit allocation IP is {pulp.LpStatus[status].lower()}: relax the budget "
                            "or the ties")
    return torch.tensor([max(range(O), key=lambda o: x[l][o].value()) for l in range(L)])
