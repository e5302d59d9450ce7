"""Perplexity vs effective bits per weight: uniform vs ip / baq / pareto (GPTQ, g128), SmolLM2-135M.

    python bench/alloc_table.py [--budgets 2.5,3.0,3.5,4.25] [--allocs ip,baq,pareto]
                                [--sensitivity hessian] [--max-windows 40]

Uniform baseline at a budget: the widest uniform width whose effective bits per weight fit it.
Results accumulate in bench/results/alloc_results.json (re-running skips finished rows).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals.data import load_text  # noqa: E402
from evals.perplexity import perplexity, tokenize  # noqa: E402
from quantkit.model.loader import load_model  # noqa: E402
from quantkit.pipeline import run  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.25")
    ap.add_argument("--allocs", default="uniform,ip,baq,pareto")
    ap.add_argument("--sensitivity", default="hessian")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--out", default="bench/results/alloc_results.json")
    a = ap.parse_args()
    base = load_recipe("llama").with_overrides(group_size=128, method="gptq", out=None,
                                               sensitivity=a.sensitivity)
    path = Path(a.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    model, tok, _ = load_model(base.model)
    ids = tokenize(tok, load_text(base.eval.dataset, "eval"))
    if "fp32" not in results:
        results["fp32"] = perplexity(model, ids, base.eval.seqlen, a.max_windows, progress=False)
    del model
    for budget in (float(b) for b in a.budgets.split(",")):
        for alloc in a.allocs.split(","):
            key = f"{alloc} {a.sensitivity if alloc != 'uniform' else ''} {budget}".replace("  ", " ")
            if key in results:
                continue
            if alloc == "uniform":
                bits = max((b for b in (2, 3, 4, 8) if b <= budget), default=2)
                r = base.with_overrides(bits=bits, alloc="uniform")
            else:
                r = base.with_overrides(bits=budget, alloc=alloc)
            t = time.time()
            rep = run(r, progress=False)
            res = perplexity(rep.model, ids, base.eval.seqlen, a.max_windows, progress=False)
            bits_hist: dict[int, int] = {}
            for info in rep.layers.values():
                bits_hist[info["bits"]] = bits_hist.get(info["bits"], 0) + 1
            res.update(budget=budget, alloc=alloc, bits_per_weight=rep.bits_per_weight,
                       seconds=time.time() - t, ratio=res["ppl"] / results["fp32"]["ppl"],
                       layers_per_bits=bits_hist)
            results[key] = res
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            print(f"{key}: ppl {res['ppl']:.3f} (x{res['ratio']:.3f}) at {rep.bits_per_weight:.3f} bpw "
                  f"{bits_hist} {res['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
