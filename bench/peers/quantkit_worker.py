"""quantkit's own pipeline (the `rtn` and `quantkit` rows), run as a worker of the main venv so
that its peak RSS is measured like every peer's.

Options (JSON): {"recipe": "llama", "overrides": {KEY: VALUE, ...}} (calib.dataset and
calib.n_samples among them for calibrated rows); BITS, GROUP and MODEL_DIR override them.
quantkit draws its calibration tokens itself with the same call the parent uses
(calibration_batches(tok, fold, n, 512, seed 0, batch 8)); after the timed run() the worker
checks that they equal CALIB_PT. The time is around run(), which includes loading the model
and tokenizing the calibration text.
"""
from __future__ import annotations

from common import block_linears, load_calib, main, timed, version


def formula(recipe) -> str:
    zero = "" if recipe.sym else f" + {recipe.bits}-bit zero"
    return (f"stored bits / weights (Report.bits_per_weight): {recipe.bits} + (16 fp16 scale"
            f"{zero}) / {recipe.group_size}; zeros are packed in int32 words per row (the "
            "excess over the formula is that padding), g_idx stored only for non-contiguous groups")


def check_calib(recipe, tokenizer, path: str) -> None:
    """The windows run() calibrated on are the parent's (CALIB_PT)."""
    import torch
    from quantkit.calib.text import calibration_batches
    c = recipe.calib
    mine = torch.cat(calibration_batches(tokenizer, c.dataset, c.n_samples, c.seqlen,
                                         recipe.seed, c.batch_size))
    if not torch.equal(mine, load_calib(path)):
        raise RuntimeError(f"quantkit's calibration windows differ from {path}")


def quantize(a):
    from quantkit.pipeline import run
    from quantkit.recipe import load_recipe
    overrides = {**a.options.get("overrides", {}),     # --configs and the model win over --set
                 "model": a.model_dir, "bits": a.bits, "group_size": a.group_size, "out": None}
    recipe = load_recipe(a.options.get("recipe", "llama")).with_overrides(**overrides)
    rep, seconds, rss = timed(run, recipe, progress=False)
    if a.calib != "-":
        check_calib(recipe, rep.tokenizer, a.calib)
    weights = {n: m.weight.data for n, m in block_linears(rep.model).items()}
    if len(weights) != rep.n_layers:
        raise RuntimeError(f"{rep.n_layers} layers quantized but {len(weights)} block linears found")
    return weights, {"quant_seconds": seconds, "peak_rss_mb": rss, "version": version("quantkit"),
                     "bits_per_weight": rep.bits_per_weight,
                     "bpw_formula": formula(recipe),
                     "settings": {k: v for k, v in recipe.to_dict().items()
                                  if k in ("method", "bits", "group_size", "sym", "act_order",
                                           "static_groups", "mse", "damp", "fp_target", "true_sequential")}
                     | {"calib_seqlen": recipe.calib.seqlen}}


if __name__ == "__main__":
    main(quantize)
