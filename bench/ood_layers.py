"""Why a narrow calibration hurts GPTQ out of domain, layer by layer, on SmolLM2-135M.

    python bench/ood_layers.py [--blocks 0,10,20,29] [--windows 16] [--damps 0.01,0.1]

For a few blocks of the unquantized model, each domain's Hessian H_d = E[x xᵀ] of every
linear's inputs is collected from the eval parts (16 x 512 tokens each). Each linear is then
quantized (4-bit g128 and 3-bit g128) by RTN (min-max) and by GPTQ with the Hessian of a
calibration set (austen alone, fold-a, or all six domains' calibration parts), and scored on
every domain d by the relative output error tr(E H_d Eᵀ) / tr(W H_d Wᵀ). GPTQ minimises the
error under H_calib; where H_d has energy in directions H_calib lacks, GPTQ's error feedback
has pushed error there and the loss on d can end above RTN's. Writes bench/results/ood_layers.json.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evals.data import BUNDLED, domains, load_text  # noqa: E402
from evals.suite import geomean  # noqa: E402
from quantkit.calib.text import calibration_batches  # noqa: E402
from quantkit.model.discovery import find_blocks, linears, weight_matrix  # noqa: E402
from quantkit.model.loader import load_model  # noqa: E402
from quantkit.model.runner import input_groups, walk_blocks  # noqa: E402
from quantkit.stats.hessian import collect_hessians  # noqa: E402
from quantkit.quant.base import LayerStats, QSpec, proxy_loss  # noqa: E402
from quantkit.quant.gptq import gptq  # noqa: E402
from quantkit.quant.rtn import rtn  # noqa: E402
from results_io import default_path, save_rows  # noqa: E402


def eval_batches(tok, name: str, n: int, seqlen: int = 512) -> list[torch.Tensor]:
    ids = tok(load_text(name, "eval"), return_tensors="pt").input_ids[0]
    starts = torch.linspace(0, ids.numel() - seqlen - 1, n).long().tolist()
    return list(torch.stack([ids[s:s + seqlen] for s in starts]).split(8))


@torch.no_grad()
def hessians(model, batches, blocks: set[int]) -> dict[str, torch.Tensor]:
    """H of every linear's inputs in the listed blocks, unquantized model."""
    out = {}
    for i, prefix, block, inputs in walk_blocks(model, batches, torch.device("cpu"), "H", False):
        if i in blocks:
            groups = input_groups(block, inputs)
            accs = collect_hessians(block, inputs, groups, stop_early=False)
            for g in groups:
                for n in g:
                    out[f"{prefix}.{n}"] = accs[g[0]].finalize().H
        if i >= max(blocks):
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,10,20,29")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--damps", default="0.01,0.1")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    blocks = {int(b) for b in a.blocks.split(",")}
    model, tok, _ = load_model("smollm2-135m")
    H_eval = {d: hessians(model, eval_batches(tok, d, a.windows), blocks) for d in BUNDLED}
    calibs = {c: hessians(model, calibration_batches(tok, c, a.windows * (1 if c == "austen" else 3),
                                                     512, 0), blocks)
              for c in ("austen", "fold-a", "mix")}
    prefix, mods = find_blocks(model)
    names = [f"{prefix}.{i}.{n}" for i in sorted(blocks) for n in linears(mods[i])]
    rows = {}
    for bits in (4, 3):
        spec = QSpec(bits=bits, group_size=128, mse=False, static_groups=True)
        for name in names:
            W = weight_matrix(model.get_submodule(name)).float()
            rel = lambda Q, d: proxy_loss(W - Q, H_eval[d][name]) / proxy_loss(W, H_eval[d][name])  # noqa: E731
            cands = {"rtn": rtn(W, None, spec).dequantize()}
            for c, Hc in calibs.items():
                for damp in (float(x) for x in a.damps.split(",")):
                    s = QSpec(**{**spec.__dict__, "damp": damp})
                    cands[f"gptq {c} damp {damp}"] = gptq(W, LayerStats(H=Hc[name], n=1), s).dequantize()
            for k, Q in cands.items():
                rows.setdefault(f"w{bits} {k}", {}).setdefault(name, {d: rel(Q, d) for d in BUNDLED})
    summary = {}
    for key, per_layer in rows.items():
        bits = key.split()[0]
        rtn_rows = rows[f"{bits} rtn"]
        summary[key] = {d: geomean(per_layer[n][d] / rtn_rows[n][d] for n in names) for d in BUNDLED}
        calib = key.split()[2] if "gptq" in key else None
        unseen = [d for d in BUNDLED if calib and d not in domains(calib)]
        if unseen:
            summary[key]["geomean_vs_rtn_unseen_domains"] = geomean(summary[key][d] for d in unseen)
        print(f"{key:28s} " + " ".join(f"{d} {summary[key][d]:.3f}" for d in BUNDLED), flush=True)
    save_rows(a.out, {"summary": summary, "layers": rows, "blocks": sorted(blocks),
                      "windows": a.windows}, __file__, merge=False)


if __name__ == "__main__":
    main()
