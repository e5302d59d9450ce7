"""What the perplexity-table benches share: arguments, recipe overrides, the results file, eval ids."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evals.data import COMPOSITES  # noqa: E402
from evals.perplexity import eval_ids_with_baseline  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from results_io import load_rows, save_rows  # noqa: E402


def table_parser(out: str, max_windows: int) -> argparse.ArgumentParser:
    """--recipe, --max-windows, --set KEY=VALUE, --label, --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="llama")
    ap.add_argument("--max-windows", type=int, default=max_windows)
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--label", default="", help="suffix for the result keys of this variant")
    ap.add_argument("--out", default=out)
    return ap


def parse_sets(sets: list[str]) -> dict:
    """--set KEY=VALUE arguments as recipe overrides (values parsed as YAML)."""
    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in sets)}


def single_text(recipe):
    """The recipe, scored on Pride and Prejudice when its eval dataset is the multi-domain suite:
    the single-text tables score one text (the out-of-domain protocol is bench/ood_quality.py)."""
    if recipe.eval.dataset not in COMPOSITES:
        return recipe
    print(f"single-text table: calibrated on {recipe.calib.dataset}, scored on Pride and Prejudice; "
          "for out-of-domain numbers use bench/ood_quality.py", flush=True)
    return recipe.with_overrides(**{"eval.dataset": "austen"})


def table_setup(a):
    """(base recipe, overrides, results path, results so far with the fp32 row, eval token ids)."""
    base = load_recipe(a.recipe)
    overrides = parse_sets(a.set)
    base = single_text(base.with_overrides(**{"eval.dataset": overrides.get("eval.dataset")}))
    path = Path(a.out)
    results = load_rows(path)
    ids = eval_ids_with_baseline(base, a.max_windows, results)
    print(f"fp32 ppl {results['fp32']['ppl']:.3f}", flush=True)
    return base, overrides, path, results, ids


def write_row(path: Path, results: dict, key: str, res: dict) -> dict:
    """results plus one row, written out under the envelope of the script that runs (results_io);
    the file is re-read first so that rows written by a run beside this one stay."""
    return save_rows(path, {**results, **load_rows(path), key: res}, sys.argv[0], merge=False)
