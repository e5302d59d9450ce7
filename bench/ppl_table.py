"""RTN vs GPTQ perplexity on SmolLM2-135M (offline asset), written to bench/results/.

    python bench/ppl_table.py [--max-windows 40] [--configs 4:128,4:-1,3:128,2:64]

Calibration: 128 x 512 tokens of the austen calibration books; eval: the first
max-windows 1024-token windows of Pride and Prejudice (never in calibration).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals.perplexity import eval_ids_with_baseline, perplexity  # noqa: E402
from quantkit.pipeline import run  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="llama")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--configs", default="3:128,4:128,4:-1,2:64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--label", default="", help="suffix for the result keys of this variant")
    ap.add_argument("--out", default="bench/results/smollm2_ppl.json")
    a = ap.parse_args()
    base = load_recipe(a.recipe)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    path = Path(a.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    ids = eval_ids_with_baseline(base, a.max_windows, results)
    ev = lambda m: perplexity(m, ids, base.eval.seqlen, a.max_windows)  # noqa: E731
    print(f"fp32 ppl {results['fp32']['ppl']:.3f}", flush=True)
    for cfg in a.configs.split(","):
        bits, gs = (int(x) for x in cfg.split(":"))
        for method in a.methods.split(","):
            key = f"{method}{a.label} w{bits} g{gs}"
            if key in results:
                continue
            r = base.with_overrides(method=method, bits=bits, group_size=gs, out=None, **overrides)
            t = time.time()
            rep = run(r, progress=False)
            res = ev(rep.model)
            res.update(seconds=time.time() - t, bits_per_weight=rep.bits_per_weight,
                       recipe=r.to_dict(), ratio=res["ppl"] / results["fp32"]["ppl"])
            results[key] = res
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            print(f"{key}: ppl {res['ppl']:.3f} (x{res['ratio']:.3f}) {res['bits_per_weight']:.3f} bpw "
                  f"{res['seconds']:.0f}s", flush=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
