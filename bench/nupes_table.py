"""NUPES vs uniform grids on SmolLM2-135M (offline asset): perplexity at 4 and 3 bits, g128.

    python bench/nupes_table.py [--rows rtn:4:0,nupes-df:4,...] [--max-windows 20]
    python bench/nupes_table.py --kernel      # LUT kernel speed at batch 1 on 576x1536, printed

Rows are METHOD:BITS[:SYM]. Data-free: RTN (asymmetric and symmetric) vs nupes-df; data-driven:
GPTQ (asymmetric, act-order) vs nupes. Cheap protocol: 32 x 512 calibration tokens, no
fp_target (every method aims at its own quantized inputs), the first 20 eval windows of 1024.
Results accumulate in bench/results/nupes_table.json (re-running skips finished rows).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals.perplexity import eval_ids_with_baseline, perplexity  # noqa: E402
from ppl_common import single_text  # noqa: E402
from quantkit.pipeline import run  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from results_io import default_path, load_rows, save_rows  # noqa: E402

ROWS = ("rtn:4:0,rtn:4:1,nupes-df:4,rtn:3:0,rtn:3:1,nupes-df:3,"
        "gptq:3:0,nupes:3,gptq:4:0,nupes:4")


def kernel_speed(out_f: int = 576, in_f: int = 1536, reps: int = 200) -> dict:
    """Milliseconds per batch-1 call: fp32 dense, the reference kernel, the LUT kernel (3 and 4 bits)."""
    from quantkit.kernels import lut as lut_kernel
    from quantkit.kernels import reference
    from quantkit.quant.base import QSpec
    from quantkit.quant.nupes import nupes_df

    def ms(f) -> float:
        f(x)
        t = time.perf_counter()
        for _ in range(reps):
            f(x)
        return (time.perf_counter() - t) / reps * 1e3

    W = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(1, in_f)
    res = {"shape": [out_f, in_f], "threads": torch.get_num_threads(),
           "fp32_dense_ms": ms(lambda v: torch.nn.functional.linear(v, W))}
    for bits in (3, 4):
        p = nupes_df(W, None, QSpec(bits=bits, group_size=128))
        res[f"reference_w{bits}_ms"] = ms(reference.prepare(p, None))
        res[f"lut_w{bits}_ms"] = ms(lut_kernel.prepare(p, None))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--out", default=str(default_path(__file__)))
    ap.add_argument("--kernel", action="store_true", help="only time the LUT kernel and print it")
    a = ap.parse_args()
    if a.kernel:
        print(json.dumps(kernel_speed(), indent=2))
        return
    base = load_recipe("llama").with_overrides(**{
        "group_size": 128, "fp_target": False, "out": None,
        "calib.n_samples": 32, "calib.seqlen": 512, "eval.max_windows": a.max_windows})
    base = single_text(base)
    path = Path(a.out)
    results = load_rows(path)
    results["protocol"] = (f"SmolLM2-135M, g{base.group_size}, calibration {base.calib.n_samples} x "
                           f"{base.calib.seqlen} tokens of {base.calib.dataset}, fp_target off, "
                           f"true-sequential; eval: first {a.max_windows} windows of "
                           f"{base.eval.seqlen} tokens of {base.eval.dataset}; torch threads "
                           f"{torch.get_num_threads()}")
    rows = results.setdefault("rows", {})
    ids = eval_ids_with_baseline(base, a.max_windows, results)
    fp = results["fp32"]["ppl"]
    print(f"fp32 ppl {fp:.3f}", flush=True)
    for row in a.rows.split(","):
        method, bits, *sym = row.split(":")
        sym = bool(int(sym[0])) if sym else True
        key = f"{method}{'' if method.startswith('nupes') else (' sym' if sym else ' asym')} w{bits}"
        if key in rows:
            continue
        r = base.with_overrides(method=method, bits=int(bits), sym=sym)
        t = time.time()
        rep = run(r, progress=False)
        res = perplexity(rep.model, ids, base.eval.seqlen, a.max_windows, progress=False)
        proxies = [v["proxy_loss"] for v in rep.layers.values() if "proxy_loss" in v]
        rows[key] = {"method": method, "bits": int(bits), "sym": sym, "bits_per_weight": rep.bits_per_weight,
                     "ppl": res["ppl"], "x_fp32": res["ppl"] / fp, "seconds": time.time() - t,
                     "sum_proxy_loss": sum(proxies) if proxies else None}
        save_rows(path, results, __file__, merge=False)
        print(f"{key}: ppl {res['ppl']:.3f} (x{res['ppl'] / fp:.3f}) {rep.bits_per_weight:.3f} bpw "
              f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
