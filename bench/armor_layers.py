"""ARMOR on real SmolLM2-135M layers: its own proxy from init to end (monotone, strictly lower),
time per iteration, and every 2:4 pruner's full-Hessian loss tr(E H Eᵀ)/tr(W H Wᵀ) side by side
-> bench/results/armor_layers.json.

    python bench/armor_layers.py [--layers 0,10,20,29] [--set armor.iters=500]

Inputs: the fp model's, on the llama recipe's calibration windows (32 x 512 tokens by default);
ARMOR's options come from the recipe's `armor:` section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from ppl_common import parse_sets
from quantkit import registry
from quantkit.calib.text import calibration_batches
from quantkit.model.discovery import find_blocks, linears, weight_matrix
from quantkit.model.loader import load_model
from quantkit.prune import pruners  # noqa: F401  (registers the pruners)
from quantkit.prune.armor import armor_dense, armor_factorize
from quantkit.prune.pruners import ArmorConfig
from quantkit.quant.base import proxy_loss
from quantkit.recipe import load_recipe
from quantkit.stats.hessian import HessianAccumulator
from results_io import default_path, save_rows  # noqa: E402

BASELINES = ("magnitude", "wanda", "sparsegpt")


def layer_stats(model, blocks, layers: list[int], batches) -> dict:
    """{(layer, name): LayerStats} of the fp model's inputs to every linear of those blocks."""
    acc, hooks = {}, []
    for i in layers:
        for name, mod in linears(blocks[i]).items():
            a = acc[(i, name)] = HessianAccumulator(mod.in_features)
            hooks.append(mod.register_forward_pre_hook(lambda _m, inp, a=a: a.add(inp[0])))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: a.finalize() for k, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="llama")
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    r = load_recipe(a.recipe).with_overrides(**{"calib.n_samples": 32, **parse_sets(a.set)})
    torch.manual_seed(r.seed)
    model, tok, _ = load_model(r.model)
    batches = calibration_batches(tok, r.calib.dataset, r.calib.n_samples, r.calib.seqlen, r.seed,
                                  r.calib.batch_size)
    layers = [int(x) for x in a.layers.split(",")]
    _, blocks = find_blocks(model)
    stats = layer_stats(model, blocks, layers, batches)
    opts = dataclasses.asdict(r.section("armor", ArmorConfig))
    rows = []
    for (i, name), st in stats.items():
        W = weight_matrix(blocks[i].get_submodule(name)).detach().float()
        ref = proxy_loss(W, st.H)
        row, packed = {"layer": i, "name": name, "shape": list(W.shape)}, {}
        for p in (*BASELINES, "armor"):
            t = time.perf_counter()
            packed[p] = registry.get("pruner", p)(W, st, None, 2, 4, **(opts if p == "armor" else {}))
            row[p] = {"loss": proxy_loss(W - packed[p].dequantize(), st.H) / ref, "seconds": time.perf_counter() - t}
        # the factorization alone, again, for its loss history (the pruner returns only the layer)
        init_mask = None if opts["init"] == "nowag" else packed[opts["init"]].dequantize() != 0
        f = armor_factorize(W, st.H.diagonal(), 2, 4, opts["block_size"], opts["iters"], opts["lr"],
                            init_mask, opts["seed"])
        row["armor_fit"] = {"loss": proxy_loss(W - armor_dense(f), st.H) / ref, "seconds": f.seconds}
        row["armor_proxy"] = {"init": f.losses[0], "end": f.losses[-1], "iters": len(f.losses) - 1,
                              "monotone": all(x >= y for x, y in zip(f.losses, f.losses[1:])),
                              "ms_per_iter": 1e3 * f.seconds / max(len(f.losses) - 1, 1)}
        rows.append(row)
        print(f"{i:2d} {name:18s} " + " ".join(f"{p} {row[p]['loss']:.4f}" for p in (*BASELINES, "armor_fit", "armor"))
              + f" | armor proxy {f.losses[0]:.4f} -> {f.losses[-1]:.4f}", flush=True)
    summary = {p: sum(x[p]["loss"] for x in rows) / len(rows) for p in (*BASELINES, "armor_fit", "armor")}
    summary["armor_fit_beats_sparsegpt"] = sum(x["armor_fit"]["loss"] < x["sparsegpt"]["loss"] for x in rows)
    summary["armor_beats_sparsegpt"] = sum(x["armor"]["loss"] < x["sparsegpt"]["loss"] for x in rows)
    summary["armor_strictly_lower"] = sum(x["armor_proxy"]["end"] < x["armor_proxy"]["init"] for x in rows)
    summary["armor_monotone"] = sum(x["armor_proxy"]["monotone"] for x in rows)
    summary["layers"] = len(rows)
    res = {"protocol": f"fp inputs, {r.calib.n_samples} x {r.calib.seqlen} calibration tokens ({r.calib.dataset}); "
                       "loss = tr(E H Eᵀ) / tr(W H Wᵀ); armor_fit = the factorization alone (no refit, no "
                       "baseline fallback); armor = the pruner; armor_proxy = ARMOR's diagonal-Hessian proxy",
           "armor": opts,
           "summary": summary, "rows": rows}
    print(json.dumps(summary, indent=1))
    save_rows(a.out, res, __file__, merge=False)


if __name__ == "__main__":
    main()
