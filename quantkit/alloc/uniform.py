"""Uniform: every layer at the recipe's one width (--alloc uniform, the default)."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.alloc.table import CostTable
from quantkit.registry import register


@register("allocator", "uniform")
def uniform(table: CostTable, bits_per_weight: float) -> Tensor:
    """One option for all layers: the largest whose average size fits the budget. The pipeline
    needs no cost table for it (needs_table False): it plans the recipe's width directly."""
    table.check_feasible(bits_per_weight)
    bpw = table.size.sum(0) / table.weights.sum()
    fits = torch.nonzero(bpw <= bits_per_weight + 1e-9).flatten()
    best = int(fits[bpw[fits].argmax()]) if len(fits) else int(bpw.argmin())
    return torch.full((len(table.layers),), best, dtype=torch.long)


uniform.needs_table = False
