"""LLM.int8() on CPU: matmul speed vs dense, and perplexity of SmolLM2-135M vs fp32.

    python bench/llm_int8.py speed [--batches 1,64]
    python bench/llm_int8.py ppl [--max-windows 40] [--n-samples 16] [--thresholds 6,4,3,2]

speed: median ms of fp32 and bf16 F.linear, our int8 kernel (torch._int_mm; with and without
outlier features in the batch) and bitsandbytes' int8 matmul, on SmolLM2's layer shapes and a
4096 x 4096 one. ppl: the model quantized with --method llm-int8 (8 bits, calibration outlier
columns kept in fp16) evaluated with LLM.int8 arithmetic (activations in int8 too) at several
outlier thresholds, and with the weights alone (reference kernel). Both write their row ("speed" / "ppl") of bench/results/llm_int8.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from quantkit.formats.llm_int8 import make_llm_int8  # noqa: E402
from quantkit.kernels import KERNELS  # noqa: E402
from quantkit.quant.llm_int8 import LLMInt8Config  # noqa: E402
from results_io import default_path, save_rows  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]


def _ms(fn, x) -> float:
    t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=0.5).median * 1e3


def speed(batches: list[int]) -> dict:
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        W = torch.randn(out_f, in_f) * 0.02
        p = make_llm_int8(W)
        kernels = {k: KERNELS[k].prepare(p, None) for k in ("cpu_llm_int8", "bnb_int8")}
        Wb = W.bfloat16()
        for m in batches:
            x = torch.randn(m, in_f)
            xo = x.clone()
            xo[:, :4] *= 20                          # four outlier features in the batch
            row = {"shape": [out_f, in_f], "batch": m, "fp32_ms": _ms(lambda t: F.linear(t, W), x),
                   "bf16_ms": _ms(lambda t: F.linear(t, Wb), x.bfloat16()),
                   "int8_ms": _ms(kernels["cpu_llm_int8"], x),
                   "int8_outliers_ms": _ms(kernels["cpu_llm_int8"], xo),
                   "bnb_ms": _ms(kernels["bnb_int8"], x.bfloat16())}
            row["speedup_vs_fp32"] = row["fp32_ms"] / row["int8_ms"]
            rows.append(row)
            print(json.dumps(row))
    return {"threads": torch.get_num_threads(), "rows": rows}


def ppl(max_windows: int, n_samples: int, thresholds: list[float]) -> dict:
    import quantkit
    from evals.data import load_text
    from evals.perplexity import perplexity, tokenize
    from quantkit.model.loader import load_model
    from quantkit.pipeline import run
    from quantkit.recipe import load_recipe
    recipe = load_recipe("llama").with_overrides(method="llm-int8", bits=8, out="out/llama-llm-int8",
                                                 **{"calib.n_samples": n_samples})
    from ppl_common import single_text
    recipe = single_text(recipe)
    model, tok, _ = load_model(recipe.model)
    ids = tokenize(tok, load_text(recipe.eval.dataset, "eval"))
    res = {"fp32": perplexity(model, ids, recipe.eval.seqlen, max_windows, progress=False)["ppl"]}
    del model
    rep = run(recipe, progress=False, overwrite=True)
    layers = json.loads((Path(recipe.out) / "config.json").read_text())["quantization_config"]["layers"]
    from quantkit.nn.qlinear import QuantLinear
    m = quantkit.load(recipe.out, kernel="reference")
    with torch.no_grad():
        res["int8_weights_only"] = perplexity(m, ids, recipe.eval.seqlen, max_windows, progress=False)["ppl"]
    m = quantkit.load(recipe.out, keep_packed=True)
    for t in thresholds:   # the threshold is a run-time parameter: prepare the kernels again
        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.meta["threshold"], q._prepared_for = t, None
        with torch.no_grad():
            res[f"llm_int8_threshold_{t:g}"] = perplexity(m, ids, recipe.eval.seqlen, max_windows,
                                                          progress=False)["ppl"]
    from quantkit.formats.io import load_tensors
    t = load_tensors(recipe.out)
    res["outlier_columns"] = {n: int(t[f"{n}.outlier_cols"].numel()) for n in layers if f"{n}.outlier_cols" in t}
    res["bits_per_weight"] = rep.bits_per_weight
    res["ratio_vs_fp32"] = {k: v / res["fp32"] for k, v in res.items() if k.startswith(("llm_int8", "int8"))}
    res["protocol"] = (f"SmolLM2-135M; calibration {n_samples} x 512 austen tokens (fp16 outlier "
                       f"columns: act absmax >= {recipe.section('llm_int8', LLMInt8Config).threshold:g}, the recipe's threshold); ppl on the first {max_windows} x 1024-token windows of "
                       "Pride and Prejudice; llm_int8_threshold_T = LLM.int8 arithmetic with outlier threshold T, "
                       "int8_weights_only = the int8 weights with fp activations (reference kernel)")
    print(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "ppl"])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--thresholds", default="6,4,3,2")
    a = ap.parse_args()
    res = (speed([int(b) for b in a.batches.split(",")]) if a.what == "speed"
           else ppl(a.max_windows, a.n_samples, [float(t) for t in a.thresholds.split(",")]))
    save_rows(default_path(__file__), {a.what: res}, __file__)     # rows "speed" and "ppl"


if __name__ == "__main__":
    main()
