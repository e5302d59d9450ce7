"""Allocation speed: table -> bits for 1000 layers x 4 options, per allocator.

    python bench/alloc_speed.py    # writes bench/results/alloc_speed.json
"""
from __future__ import annotations

import time

import torch

from quantkit.alloc.baq import baq_allocate
from quantkit.alloc.ip import ip_allocate
from quantkit.alloc.pareto import pareto_allocate
from quantkit.alloc.table import as_table
from results_io import default_path, save_rows  # noqa: E402


def main(L: int = 1000) -> None:
    g = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 64, (L,), generator=g).double() * 4096
    bits = torch.tensor([2.0, 3.0, 4.0, 8.0], dtype=torch.float64)
    size = weights[:, None] * (bits + 0.1875)
    cost = torch.rand(L, 1, generator=g, dtype=torch.float64) * torch.pow(2.0, -2 * bits) * weights[:, None]
    table = as_table(cost, size, weights)
    res = {"layers": L, "options": 4, "seconds": {}}
    for name, fn in (("ip", ip_allocate), ("pareto", pareto_allocate), ("baq", baq_allocate)):
        t = time.perf_counter()
        fn(table, 3.0)
        res["seconds"][name] = time.perf_counter() - t
        print(f"{name:7s} {res['seconds'][name]:.3f} s")
    save_rows(default_path(__file__), res, __file__, merge=False)


if __name__ == "__main__":
    main()
