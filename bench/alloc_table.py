"""Perplexity vs effective bits per weight: uniform vs ip / baq / pareto (GPTQ, g128), SmolLM2-135M.

    python bench/alloc_table.py [--budgets 2.5,3.0,3.5,4.25] [--allocs ip,baq,pareto]
                                [--sensitivities hessian,fisher] [--set calib.n_samples=64 ...]

Uniform rows are run at every width in --uniform; each budget is compared with the widest
uniform width whose effective bits per weight fit it. One cost table per sensitivity is built
once and shared by the allocators; an allocation equal to one already evaluated reuses its row.
Results accumulate in bench/results/alloc_table.json (re-running skips finished rows).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals.perplexity import eval_ids_with_baseline, perplexity  # noqa: E402
from ppl_common import single_text  # noqa: E402
from quantkit.pipeline import allocate, run, sensitivity_table  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from results_io import default_path, load_rows, save_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.25")
    ap.add_argument("--allocs", default="ip,baq,pareto")
    ap.add_argument("--uniform", default="2,3,4")
    ap.add_argument("--sensitivities", default="hessian")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--out", default=str(default_path(__file__)))
    ap.add_argument("--table-cache", default=None, help="directory to keep/reuse cost tables (.pt)")
    a = ap.parse_args()
    sets = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    # mixed: {}: the allocators compared on the recipe's own GPTQ grid, not on its mixed: section
    base = load_recipe("llama").with_overrides(**{"group_size": 128, "method": "gptq", "out": None,
                                                  "mixed": {}, **sets})
    base = single_text(base)
    path = Path(a.out)
    results = load_rows(path)
    results["recipe"] = base.to_dict()
    rows = results.setdefault("rows", {})
    ids = eval_ids_with_baseline(base, a.max_windows, results)
    fp = results["fp32"]["ppl"]
    by_plan = {tuple(r["bits"]): k for k, r in rows.items()}

    def evaluate(key: str, recipe, table=None, **extra) -> None:
        t = time.time()
        rep = run(recipe, progress=False, table=table)
        bits = [info["bits"] for info in rep.layers.values()]
        res = perplexity(rep.model, ids, base.eval.seqlen, a.max_windows, progress=False)
        res.update(ratio=res["ppl"] / fp, bits_per_weight=rep.bits_per_weight, bits=bits,
                   layers_per_bits={b: bits.count(b) for b in sorted(set(bits))},
                   seconds=time.time() - t, **extra)
        save(key, res)
        by_plan[tuple(bits)] = key

    def save(key: str, res: dict) -> None:
        rows[key] = res
        save_rows(path, results, __file__, merge=False)
        print(f"{key}: ppl {res['ppl']:.3f} (x{res['ratio']:.3f}) at {res['bits_per_weight']:.3f} bpw "
              f"{res['layers_per_bits']}", flush=True)

    for b in (int(x) for x in a.uniform.split(",")):
        if f"uniform {b}" not in rows:
            evaluate(f"uniform {b}", base.with_overrides(bits=b, alloc="uniform"))
    cache = Path(a.table_cache) if a.table_cache else None
    for sens in a.sensitivities.split(","):
        table = None
        for budget in (float(x) for x in a.budgets.split(",")):
            for alloc in a.allocs.split(","):
                key = f"{alloc} {sens} {budget}"
                if key in rows:
                    continue
                r = base.with_overrides(bits=budget, alloc=alloc, sensitivity=sens)
                if table is None:
                    f = cache / f"{sens}.pt" if cache else None
                    if f is not None and f.exists():
                        table = torch.load(f, weights_only=False)
                    else:
                        t = time.time()
                        table = sensitivity_table(r, progress=False)
                        results.setdefault("table_seconds", {})[sens] = time.time() - t
                        if f is not None:
                            cache.mkdir(parents=True, exist_ok=True)
                            torch.save(table, f)
                choice = allocate(r, table)
                bits = [table.options[int(o)].bits for o in choice]
                cost = float(table.cost.gather(1, choice[:, None]).sum())  # what the allocator minimised
                if tuple(bits) in by_plan:          # an allocation evaluated before: same model
                    save(key, dict(rows[by_plan[tuple(bits)]], same_as=by_plan[tuple(bits)],
                                   table_cost=cost))
                else:
                    evaluate(key, r, table, table_cost=cost)

    summary = {}
    for key, r in rows.items():
        if key.startswith("uniform"):
            continue
        budget = float(key.split()[-1])
        fits = [u for k, u in rows.items() if k.startswith("uniform") and u["bits_per_weight"] <= budget]
        if fits:
            u = min(fits, key=lambda u: u["ppl"])
            summary[key] = {"ppl": r["ppl"], "bpw": r["bits_per_weight"], "uniform_ppl": u["ppl"],
                            "uniform_bpw": u["bits_per_weight"], "ppl_cut": 1 - r["ppl"] / u["ppl"]}
    results["vs_uniform"] = summary
    save_rows(path, results, __file__, merge=False)


if __name__ == "__main__":
    main()
