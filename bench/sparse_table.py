"""2:4 pruning on SmolLM2-135M (offline asset): perplexity of dense, magnitude, Wanda, SparseGPT,
ARMOR and ARMOR + 4-bit, time per layer and ARMOR's wrapper overhead -> bench/results/sparse_table.json.

    python bench/sparse_table.py [--max-windows 20] [--rows magnitude,wanda,sparsegpt,armor,armor+w4]
        [--set armor.iters=300] [--set calib.n_samples=32]

Calibration: the llama recipe's (austen books, 512-token windows); eval: the first max-windows
1024-token windows of Pride and Prejudice. Rows already in the output file are kept, not re-run.
"""
from __future__ import annotations

import statistics
import time

from ppl_common import table_parser, table_setup, write_row
from evals.perplexity import perplexity
from quantkit.pipeline import run
from results_io import default_path  # noqa: E402


def row_overrides(row: str) -> dict:
    """'armor' -> prune armor, fp16 kept weights; 'armor+w4' -> and 4-bit g128 GPTQ on the core."""
    prune, _, quant = row.partition("+")
    return {"prune": prune, "bits": int(quant[1:]) if quant else 16}


def main() -> None:
    ap = table_parser(str(default_path(__file__)), 20)
    ap.add_argument("--rows", default="magnitude,wanda,sparsegpt,armor,armor+w4,sparsegpt+w4")
    a = ap.parse_args()
    base, overrides, path, results, ids = table_setup(a)
    for row in a.rows.split(","):
        key = f"{row}{a.label} 2:4"
        if key in results:
            continue
        r = base.with_overrides(out=None, pattern="2:4", **row_overrides(row), **overrides)
        t = time.time()
        rep = run(r, progress=False)
        res = perplexity(rep.model, ids, base.eval.seqlen, a.max_windows)
        per_layer = [v["seconds"] for v in rep.layers.values()]
        res.update(seconds=time.time() - t, bits_per_weight=rep.bits_per_weight,
                   ratio=res["ppl"] / results["fp32"]["ppl"], recipe=r.to_dict(),
                   layer_seconds={"mean": statistics.mean(per_layer), "max": max(per_layer),
                                  "total": sum(per_layer)})
        wrappers = sum(t.numel() for p in rep.packed.values() for k, t in p.tensors.items() if k in ("pre", "post"))
        if wrappers:
            dense = sum(p.shape[0] * p.shape[1] for p in rep.packed.values())
            res.update(wrapper_params=wrappers, wrapper_params_over_dense=wrappers / dense,
                       wrapper_flops_over_core=wrappers / (dense / 2))
        results = write_row(path, results, key, res)
        print(f"{key}: ppl {res['ppl']:.3f} (x{res['ratio']:.3f}) {res['bits_per_weight']:.3f} bpw, "
              f"{res['layer_seconds']['mean']:.2f} s/layer, {res['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
