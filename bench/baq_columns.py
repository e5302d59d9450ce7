"""BAQ inside a layer (--method gptq-baq) vs plain GPTQ: layer proxy loss tr(E H Eᵀ) at equal size.

    python bench/baq_columns.py [--blocks 0,15,29] [--n-samples 8]

Real SmolLM2-135M layers with Hessians from n-samples x 512 calibration tokens of the
unquantized model; writes bench/results/baq_columns.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from quantkit.calib.text import calibration_batches  # noqa: E402
from quantkit.model.loader import load_model  # noqa: E402
from quantkit.quant.base import QSpec  # noqa: E402
from quantkit.quant.gptq import gptq, gptq_baq  # noqa: E402
from quantkit.stats.sensitivity import unquantized_layers  # noqa: E402
from results_io import default_path, save_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--n-samples", type=int, default=8)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model("smollm2-135m")
    batches = calibration_batches(tok, "austen", a.n_samples, 512, 0, 8)
    want = {int(b) for b in a.blocks.split(",")}
    rows, sums = [], {}
    for name, W, stats, _ in unquantized_layers(model, batches, torch.device("cpu"), False, want):
        for bits in (int(b) for b in a.bits.split(",")):
            spec = QSpec(bits=bits, group_size=128)
            res = {"layer": name, "bits": bits}
            for meth, fn in (("gptq", gptq), ("baq", partial(gptq_baq, keep_better=False))):
                t = time.perf_counter()
                p = fn(W, stats, spec)
                E = W - p.dequantize()
                res[meth] = {"proxy": float((E @ stats.H * E).sum()), "bpw": p.bits_per_weight,
                             "seconds": time.perf_counter() - t}
            res["ratio"] = res["baq"]["proxy"] / res["gptq"]["proxy"]
            sums.setdefault(bits, []).append(res["ratio"])
            rows.append(res)
            print(f"{res['layer']:40s} {bits}b  baq/gptq proxy {res['ratio']:.3f}  bpw "
                  f"{res['baq']['bpw']:.4f} vs {res['gptq']['bpw']:.4f}", flush=True)
    summary = {b: {"median_ratio": float(torch.tensor(v).median()), "min": min(v), "max": max(v)}
               for b, v in sums.items()}
    print(json.dumps(summary, indent=1))
    save_rows(default_path(__file__), {"summary": summary, "rows": rows, "n_samples": a.n_samples},
              __file__, merge=False)


if __name__ == "__main__":
    main()
