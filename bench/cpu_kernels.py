"""Matmul speed on CPU: fp32 dense, bf16 dense, reference dequant, CPU int4/int8 paths.

    python bench/cpu_kernels.py [--out-features 4096] [--in-features 4096] [--batches 1,16]

Writes bench/results/cpu_kernels.json with medians (ms) and ratios vs fp32 dense.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from quantkit.formats.packed import make_int
from quantkit.kernels import KERNELS
from quantkit.quant.base import QSpec
from quantkit.quant.rtn import rtn_codes
from results_io import default_path, save_rows  # noqa: E402


def median_ms(fn, x) -> float:
    t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=1.0).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    torch.manual_seed(0)
    W = torch.randn(a.out_features, a.in_features) / a.in_features ** 0.5
    layers = {}
    for bits, gs in ((4, 128), (8, -1)):
        codes, s, z = rtn_codes(W, QSpec(bits=bits, group_size=gs))
        layers[bits] = make_int(codes, s, z, bits, gs)
    Wb = W.bfloat16()
    fns = {
        "fp32_dense": (lambda x: F.linear(x, W), torch.float32),
        "bf16_dense": (lambda x: F.linear(x, Wb), torch.bfloat16),
        "reference_int4": (KERNELS["reference"].prepare(layers[4], None), torch.float32),
        "cpu_int4_g128": (KERNELS["cpu_int4"].prepare(layers[4], None), torch.float32),
        "cpu_int8": (KERNELS["cpu_int8"].prepare(layers[8], None), torch.float32),
    }
    res = {"shape": [a.out_features, a.in_features], "threads": torch.get_num_threads(), "ms": {},
           "speedup_vs_fp32": {}}
    for b in (int(v) for v in a.batches.split(",")):
        ms = {name: median_ms(fn, torch.randn(b, a.in_features).to(dt)) for name, (fn, dt) in fns.items()}
        res["ms"][b] = ms
        res["speedup_vs_fp32"][b] = {k: ms["fp32_dense"] / v for k, v in ms.items()}
        for k, v in ms.items():
            print(f"batch {b:3d} {k:16s} {v:8.3f} ms  x{ms['fp32_dense'] / v:5.2f} vs fp32")
    save_rows(a.out, res, __file__, merge=False)


if __name__ == "__main__":
    main()
