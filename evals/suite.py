"""The multi-domain perplexity suite: every bundled domain, each as a ratio to fp32, and their
geometric mean; and the out-of-domain protocol (calibrate on one fold, evaluate on the other).

A quantized model is judged by `ood_ratio`: the geometric mean, over all six domains, of its
perplexity ratio to fp32, where each domain is scored by the model calibrated on the *other*
fold (fold-a: austen, pycode, gcide; fold-b: pydocs, fortunes, debref). No domain is ever
evaluated by a model that saw its calibration part.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from torch import Tensor, nn

from evals.data import COMPOSITES, domains, load_text
from evals.perplexity import perplexity, tokenize

SEQLEN = 1024
WINDOWS = 16                    # per domain, evenly spaced over its eval part
FOLDS = ("fold-a", "fold-b")


def other_fold(fold: str) -> str:
    """The fold whose domains a model calibrated on `fold` is evaluated on."""
    return FOLDS[1 - FOLDS.index(fold)]


def needs_bos(model: nn.Module) -> bool:
    """Gemma-family models expect BOS at the start of every window."""
    return getattr(getattr(model, "config", None), "model_type", "").startswith("gemma")


def eval_ids(tokenizer, dataset: str = "mix") -> dict[str, Tensor]:
    """Token ids of the eval part of every domain `dataset` names."""
    return {d: tokenize(tokenizer, load_text(d, "eval")) for d in domains(dataset)}


def evaluate(model: nn.Module, tokenizer, ids: dict[str, Tensor], seqlen: int = SEQLEN,
             windows: int | None = WINDOWS, progress: bool = False) -> dict[str, dict]:
    """Perplexity of `model` on each domain's eval ids (windows evenly spaced)."""
    bos = tokenizer.bos_token_id if needs_bos(model) else None
    return {d: perplexity(model, x, seqlen, windows, bos_id=bos, progress=progress, spread=True)
            for d, x in ids.items()}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def ratios(results: dict[str, dict], baseline: dict[str, dict]) -> dict:
    """Per-domain ppl / fp32 ppl, plus their geometric mean under "geomean"."""
    r = {d: results[d]["ppl"] / baseline[d]["ppl"] for d in results}
    return {**r, "geomean": geomean(r.values())}


def fold_domains(fold: str) -> tuple[str, ...]:
    return COMPOSITES[fold]


def _baseline_key(source: str, domain: str, ids: Tensor, seqlen: int, windows: int | None) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(source).glob("*.safetensors")):        # the weights as they are on disk
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(ids.numpy().tobytes())
    return f"{Path(source).resolve()}|{domain}|{seqlen}|{windows}|{h.hexdigest()[:16]}"


def fp32_baseline(source: str, ids: dict[str, Tensor], seqlen: int = SEQLEN,
                  windows: int | None = WINDOWS, progress: bool = False) -> dict[str, dict]:
    """The original model's results on the same windows, cached under the user cache."""
    from quantkit.model.loader import load_model
    from quantkit.model.zoo import cache_dir
    path = cache_dir() / "evals" / "fp32_baselines.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    keys = {d: _baseline_key(source, d, x, seqlen, windows) for d, x in ids.items()}
    missing = {d: ids[d] for d, k in keys.items() if k not in cache}
    if missing:
        model, tok, _ = load_model(source)
        for d, r in evaluate(model, tok, missing, seqlen, windows, progress).items():
            cache[keys[d]] = r
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return {d: cache[k] for d, k in keys.items()}


def suite(model: nn.Module, tokenizer, dataset: str = "mix", seqlen: int = SEQLEN,
          windows: int | None = WINDOWS, source: str | None = None, progress: bool = True) -> dict:
    """Perplexity on every domain `dataset` names and their geometric mean; with `source` (the
    original checkpoint) also each as a ratio to its fp32 perplexity, and the ratios' geomean."""
    ids = eval_ids(tokenizer, dataset)
    res = evaluate(model, tokenizer, ids, seqlen, windows, progress)
    out = {"dataset": dataset, "seqlen": seqlen, "windows": windows, "domains": res,
           "geomean_ppl": geomean(r["ppl"] for r in res.values())}
    if source is not None:
        base = fp32_baseline(source, ids, seqlen, windows, progress)
        rat = ratios(res, base)
        for d in res:
            res[d].update(fp32_ppl=base[d]["ppl"], ratio=rat[d])
        out["geomean_ratio"] = rat["geomean"]
    return out
