"""Out-of-domain quality of one recipe variant on SmolLM2-135M, written to bench/results/.

    python bench/ood_quality.py --label gptq-w4g128 --set method=gptq --set bits=4 [--mix]

The protocol (evals/suite.py): the variant is quantized twice, calibrated on fold-a (austen,
pycode, gcide) and on fold-b (pydocs, fortunes, debref); each domain's eval part is scored by
the model calibrated on the other fold, as a ratio to the fp32 model on the same windows, and
`ood_geomean` is the geometric mean over the six domains. --mix also quantizes once calibrated
on all six (the default calibration) and scores every domain ("mix_geomean": same domains as
the calibration, disjoint text). Rows accumulate in the results file under their label.
"""
from __future__ import annotations

import time
from pathlib import Path

from ppl_common import parse_sets, table_parser, write_row  # (sets the offline env)
from evals.suite import FOLDS, WINDOWS, eval_ids, evaluate, fold_domains, geomean, other_fold, ratios
from quantkit.model.loader import load_model
from quantkit.pipeline import run
from quantkit.recipe import load_recipe
from results_io import default_path, load_rows  # noqa: E402


def _score(recipe, ids, windows, fp32):
    t = time.time()
    rep = run(recipe, progress=False)
    seconds = time.time() - t
    res = evaluate(rep.model, rep.tokenizer, ids, windows=windows)
    return res, ratios(res, fp32), rep.bits_per_weight, seconds


def table(results: dict) -> str:
    """The rows so far as a markdown table: per-domain ratios to fp32 and the geomeans."""
    doms = list(next(v for k, v in results.items() if k.startswith("fp32")))
    lines = ["| row | bpw | " + " | ".join(doms) + " | geomean fold-b doms | ood geomean |",
             "|---" * (len(doms) + 4) + "|"]
    for k, r in results.items():
        if k.startswith("fp32") or "runs" not in r:
            continue
        bpw = sum(v["bits_per_weight"] for v in r["runs"].values()) / len(r["runs"])
        cells = [f"{r['domains'][d]['ratio']:.3f}" if d in r["domains"] else "" for d in doms]
        fb = r["runs"].get("fold-a", {}).get("geomean")
        lines.append(f"| {k} | {bpw:.3f} | " + " | ".join(cells)
                     + f" | {'' if fb is None else f'{fb:.4f}'} | "
                     + (f"{r['ood_geomean']:.4f} |" if "ood_geomean" in r else "(one fold) |"))
    return "\n".join(lines)


def main() -> None:
    ap = table_parser(str(default_path(__file__)), WINDOWS)
    ap.add_argument("--mix", action="store_true", help="also calibrate on all six domains")
    ap.add_argument("--folds", default=",".join(FOLDS), help="calibration folds to run")
    ap.add_argument("--table", action="store_true", help="print the results file as a table and stop")
    a = ap.parse_args()
    if a.table:
        print(table(load_rows(a.out)))
        return
    base = load_recipe(a.recipe).with_overrides(**parse_sets(a.set))
    path = Path(a.out)
    results = load_rows(path)
    model, tok, _ = load_model(base.model)
    ids = eval_ids(tok, "mix")
    key = f"fp32 w{a.max_windows}"
    if key not in results:
        results = write_row(path, results, key, evaluate(model, tok, ids, windows=a.max_windows))
    fp32 = results[key]
    del model
    label = a.label or "default"
    row = {"recipe_overrides": parse_sets(a.set), "windows": a.max_windows, "domains": {}, "runs": {}}
    for fold in a.folds.split(","):
        target = {d: ids[d] for d in fold_domains(other_fold(fold))}
        res, rat, bpw, sec = _score(base.with_overrides(**{"calib.dataset": fold}), target,
                                    a.max_windows, fp32)
        row["runs"][fold] = {"bits_per_weight": bpw, "seconds": sec, "geomean": rat["geomean"]}
        for d in res:
            row["domains"][d] = {"ppl": res[d]["ppl"], "ratio": rat[d], "calib": fold}
        print(f"{label} calib {fold}: {', '.join(f'{d} x{rat[d]:.3f}' for d in res)} "
              f"({bpw:.3f} bpw, {sec:.0f}s)", flush=True)
    if len(row["domains"]) == len(ids):
        row["ood_geomean"] = geomean(v["ratio"] for v in row["domains"].values())
    if a.mix:
        res, rat, bpw, sec = _score(base.with_overrides(**{"calib.dataset": "mix"}), ids,
                                    a.max_windows, fp32)
        row["mix"] = {"ratios": rat, "bits_per_weight": bpw, "seconds": sec}
        row["mix_geomean"] = rat["geomean"]
    write_row(path, results, label, row)
    head = f"ood x{row['ood_geomean']:.4f}" if "ood_geomean" in row else "one fold"
    print(f"{label}: {head}" + (f", mix x{row['mix_geomean']:.4f}" if a.mix else ""), flush=True)


if __name__ == "__main__":
    main()
