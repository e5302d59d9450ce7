"""BAQ inside a layer: a level count per input column from its GPTQ loss (gptq-baq's rounder).

The same closed form as BAQ's layer-level allocation (alloc/baq.py), with one column per
"layer": R_j = bits + (log2 L_j - mean log2 L)/θ, on the level counts worth radix-packing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.packed import levels_storage_bits

THETA = 1.95  # BAQ's fitted exponent (theory: 2)


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
