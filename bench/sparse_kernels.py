"""2:4 sparse kernels vs dense matmuls, on SmolLM2 shapes (out x in).

    OMP_NUM_THREADS=1 python bench/sparse_kernels.py [--shapes 576x1536,1536x576,4096x4096]
        [--batches 1,64] [--cuda-batches 1,64,2048] [--min-run-time 0.3]

CPU, one thread: dense fp32 / bf16 vs the cpu_sparse kernel with an fp16 core and a 4-bit g128
core, each bare and with b=32 / b=128 ARMOR wrappers (bf16; "wrapfp32" rows run the b=128
wrappers in fp32, with the relative error of both against the reference kernel). CUDA (when
present): the cuda_sparse kernel (semi-structured fp16 core) vs dense fp16. Best-of-3 medians in
ms, written to bench/results/sparse_kernels.json.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from quantkit.formats.sparse import make_sparse, make_sparse_int
from quantkit.kernels import KERNELS
from quantkit.kernels.sparse import prepare_cpu
from quantkit.prune.mask import nm_mask
from quantkit.quant.base import QSpec
from quantkit.quant.rtn import rtn_codes
from results_io import default_path, save_rows  # noqa: E402


def median_ms(fn, x, min_run_time: float, repeats: int = 3) -> float:
    """Best of `repeats` medians: other jobs sharing the cores only ever add time."""
    t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return min(t.blocked_autorange(min_run_time=min_run_time).median for _ in range(repeats)) * 1e3


def orthogonal_blocks(d: int, b: int, g: torch.Generator) -> torch.Tensor:
    """Random orthogonal b×b blocks covering d (speed does not depend on the values)."""
    return torch.linalg.qr(torch.randn(-(-d // b), b, b, generator=g))[0]


def layers(out_f: int, in_f: int) -> tuple[torch.Tensor, dict]:
    """W and {name: PackedLinear}: fp16 and 4-bit g128 cores, bare and with b=32 / b=128 wrappers."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    mask = nm_mask(W.abs())
    codes, s, z = rtn_codes(W * mask, QSpec(bits=4, group_size=128))
    out = {}
    for b in (0, 32, 128):
        wrap = {} if b == 0 else {"pre": orthogonal_blocks(in_f, b, g), "post": orthogonal_blocks(out_f, b, g)}
        tag = "" if b == 0 else f"_b{b}"
        out[f"sparse_fp16{tag}"] = make_sparse(W, mask, **wrap)
        out[f"sparse_int4g128{tag}"] = make_sparse_int(codes, mask, s, z, 4, 128, **wrap)
    return W, out


def bench_cpu(shape: tuple[int, int], batches: list[int], min_run_time: float) -> dict:
    out_f, in_f = shape
    W, packed = layers(out_f, in_f)
    Wb = W.bfloat16()
    fns = {"fp32_dense": (lambda x: F.linear(x, W), torch.float32),
           "bf16_dense": (lambda x: F.linear(x, Wb), torch.bfloat16)}
    for name, p in packed.items():
        fns[name] = (prepare_cpu(p, None), torch.float32)
        if name.endswith("_b128"):
            fns[f"{name}_wrapfp32"] = (prepare_cpu(p, None, torch.float32), torch.float32)
    res = {"ms": {}, "speedup_vs_fp32": {}, "rel_err_vs_reference": {}}
    x = torch.randn(64, in_f, generator=torch.Generator().manual_seed(1))
    for name, (fn, _) in fns.items():
        base = packed.get(name.removesuffix("_wrapfp32"))
        if base is not None:
            ref = KERNELS["reference"].prepare(base, None)(x)
            res["rel_err_vs_reference"][name] = float((fn(x) - ref).norm() / ref.norm())
    for bsz in batches:
        ms = {name: median_ms(fn, torch.randn(bsz, in_f).to(dt), min_run_time) for name, (fn, dt) in fns.items()}
        res["ms"][bsz] = ms
        res["speedup_vs_fp32"][bsz] = {k: ms["fp32_dense"] / v for k, v in ms.items()}
        for k, v in ms.items():
            err = res["rel_err_vs_reference"].get(k)
            print(f"cpu {out_f}x{in_f} batch {bsz:3d} {k:30s} {v:9.3f} ms  x{ms['fp32_dense'] / v:5.2f} vs fp32"
                  + ("" if err is None else f"  rel err {err:.1e}"))
    return res


def bench_cuda(shape: tuple[int, int], batches: list[int], min_run_time: float) -> dict:
    out_f, in_f = shape
    _, packed = layers(out_f, in_f)
    W16 = packed["sparse_fp16"].dequantize().half().cuda()
    fns = {"fp16_dense": lambda x: F.linear(x, W16)}
    for name in ("sparse_fp16", "sparse_fp16_b128"):
        p = packed[name]
        p = type(p)(p.format, p.shape, {k: t.cuda() for k, t in p.tensors.items()}, p.meta)
        if KERNELS["cuda_sparse"].supports(p):
            fns[name] = KERNELS["cuda_sparse"].prepare(p, None)
    res = {"ms": {}}
    for bsz in batches:
        ms = {k: median_ms(fn, torch.randn(bsz, in_f, device="cuda", dtype=torch.float16), min_run_time)
              for k, fn in fns.items()}
        res["ms"][bsz] = ms
        for k, v in ms.items():
            print(f"cuda {out_f}x{in_f} batch {bsz:4d} {k:20s} {v:8.4f} ms  x{ms['fp16_dense'] / v:5.2f} vs fp16")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--cuda-batches", default="1,64,2048")
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": {}, "cuda": {}}
    for shape in shapes:
        res["cpu"]["x".join(map(str, shape))] = bench_cpu(shape, batches, a.min_run_time)
    if torch.cuda.is_available():
        res["cuda_device"] = torch.cuda.get_device_name()
        for shape in shapes:
            res["cuda"]["x".join(map(str, shape))] = bench_cuda(
                shape, [int(v) for v in a.cuda_batches.split(",")], a.min_run_time)
    save_rows(a.out, res, __file__, merge=False)


if __name__ == "__main__":
    main()
