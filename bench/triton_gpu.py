"""GPU: the Triton int kernels vs fp16 dense (cuBLAS) on real layer shapes.

    python bench/triton_gpu.py [--bits 4] [--group-size 128] [--batches 1,16] [--peak-gbs 3350]

For each (out, in) shape and batch: median ms of fp16 F.linear and of the Triton kernel
(after autotuning), the speedup, and the kernel's achieved memory bandwidth (packed weight +
scales + activations + output bytes / time) as a fraction of --peak-gbs (H100 SXM: 3350 GB/s).
Checks the kernel against the dequantized weight first. Writes bench/results/triton_gpu.json.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from quantkit.formats.packed import make_int
from quantkit.kernels import KERNELS
from results_io import default_path, save_rows  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _ms(fn, x) -> float:
    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        g = a.group_size if a.group_size > 0 else in_f
        codes = torch.randint(0, 1 << a.bits, (out_f, in_f), dtype=torch.int32)
        scales = torch.rand(out_f, -(-in_f // g)) * 0.01 + 1e-3
        zeros = torch.randint(0, 1 << a.bits, scales.shape)
        p = make_int(codes, scales, zeros, a.bits, a.group_size)
        p = type(p)(p.format, p.shape, {k: t.cuda() for k, t in p.tensors.items()}, p.meta)
        W = p.dequantize().half()
        fwd = KERNELS["triton"].prepare(p, None)
        packed_bytes = sum(t.numel() * t.element_size() for t in p.tensors.values())
        for m in [int(b) for b in a.batches.split(",")]:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
            ref = F.linear(x, W)
            err = ((fwd(x).float() - ref.float()).norm() / ref.float().norm()).item()
            dense, quant = _ms(lambda t: F.linear(t, W), x), _ms(fwd, x)
            moved = packed_bytes + 2 * m * (in_f + out_f)
            rows.append({"shape": [out_f, in_f], "batch": m, "rel_err": err, "fp16_ms": dense,
                         "triton_ms": quant, "speedup": dense / quant,
                         "bandwidth_gbs": moved / quant / 1e6,
                         "bandwidth_frac_of_peak": moved / quant / 1e6 / a.peak_gbs})
            print(json.dumps(rows[-1]))
    res = {"device": torch.cuda.get_device_name(), "bits": a.bits, "group_size": a.group_size,
           "peak_gbs": a.peak_gbs, "rows": rows}
    save_rows(a.out, res, __file__, merge=False)


if __name__ == "__main__":
    main()
