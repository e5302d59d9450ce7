"""--report DIR: allocation report as JSON plus two PNG plots (no plotting library needed)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from quantkit.alloc.pareto import frontier
from quantkit.alloc.table import CostTable, total


def write_png(path: Path, img: Tensor) -> None:
    """Write an RGB uint8 image [H, W, 3] as PNG."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + bytes(img[y].flatten().tolist()) for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Canvas:
    """A white RGB canvas with a plot area mapped to data coordinates."""

    def __init__(self, w: int = 640, h: int = 360, pad: int = 30):
        self.img = torch.full((h, w, 3), 255, dtype=torch.uint8)
        self.w, self.h, self.pad = w, h, pad
        self.fill(pad, h - pad, w - pad, h - pad + 1, (0, 0, 0))      # x axis
        self.fill(pad, pad, pad + 1, h - pad, (0, 0, 0))              # y axis

    def fill(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        self.img[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = torch.tensor(color, dtype=torch.uint8)

    def to_px(self, x: float, y: float, xr, yr) -> tuple[int, int]:
        fx = (x - xr[0]) / ((xr[1] - xr[0]) or 1)
        fy = (y - yr[0]) / ((yr[1] - yr[0]) or 1)
        return (int(self.pad + fx * (self.w - 2 * self.pad)),
                int(self.h - self.pad - fy * (self.h - 2 * self.pad)))


def bits_plot(path: Path, bits: list[int]) -> None:
    """Per-layer bit width over depth, one bar per layer."""
    c = Canvas()
    xr, yr = (0, len(bits)), (0, max(bits) + 1)
    for i, b in enumerate(bits):
        x0, y0 = c.to_px(i, b, xr, yr)
        x1, _ = c.to_px(i + 1, 0, xr, yr)
        shade = {2: (214, 39, 40), 3: (255, 127, 14), 4: (31, 119, 180), 8: (44, 160, 44)}.get(b, (90, 90, 90))
        c.fill(x0, y0, max(x0 + 1, x1 - 1), c.h - c.pad, shade)
    write_png(path, c.img)


def frontier_plot(path: Path, xs: list[float], ys: list[float], point: tuple[float, float]) -> None:
    """Cost vs effective bits per weight along the frontier (log scale when all costs are
    positive); the chosen point in red."""
    c = Canvas()
    log = all(y > 0 for y in ys + [point[1]])
    tr = (lambda y: torch.log10(torch.tensor(y)).item()) if log else (lambda y: y)  # noqa: E731
    ly = [tr(y) for y in ys]
    xr, yr = (min(xs), max(xs)), (min(ly), max(ly))
    for x, y in zip(xs, ly):
        px, py = c.to_px(x, y, xr, yr)
        c.fill(px - 1, py - 1, px + 2, py + 2, (31, 119, 180))
    px, py = c.to_px(point[0], tr(point[1]), xr, yr)
    c.fill(px - 4, py - 4, px + 5, py + 5, (214, 39, 40))
    write_png(path, c.img)


def write_report(out: str | Path, table: CostTable, choice: Tensor, budget: float,
                 allocator: str, sensitivity: str) -> dict:
    """report.json, bits_over_depth.png and frontier.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = frontier(table)
    n = float(table.weights.sum())
    finite = torch.isfinite(f.cost)
    caps = torch.nonzero(finite).flatten()
    caps = caps[torch.linspace(0, len(caps) - 1, min(200, len(caps))).long()]
    xs = [float(f.at[c]) * f.unit / n for c in caps]
    ys = [float(f.cost[c]) for c in caps]
    cost, size = total(table, choice)
    bits = [table.options[int(o)].bits for o in choice]
    data = {"allocator": allocator, "sensitivity": sensitivity, "budget_bits_per_weight": budget,
            "bits_per_weight": size / n, "cost": cost,
            "layers": [{"name": name, "bits": b, "cost": float(table.cost[i, int(choice[i])]),
                        "size_bits": float(table.size[i, int(choice[i])]),
                        "costs": table.cost[i].tolist(), "sizes": table.size[i].tolist()}
                       for i, (name, b) in enumerate(zip(table.layers, bits))],
            "options": [o.bits for o in table.options],
            "frontier": {"bits_per_weight": xs, "cost": ys}}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    bits_plot(out / "bits_over_depth.png", bits)
    frontier_plot(out / "frontier.png", xs, ys, (size / n, cost))
    return data
