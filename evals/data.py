"""Named text corpora with fixed, disjoint calibration and evaluation parts.

Bundled (offline, built by evals/build_corpora.py from Debian packages), six domains:
  austen    fiction. calib: Sense and Sensibility, Emma, Mansfield Park, Northanger Abbey,
            Persuasion; eval: Pride and Prejudice
  pydocs    technical docs. calib: the Python 3.11 library reference; eval: tutorial, HOWTOs
  pycode    source code. the Python standard library; every 5th file is eval
  fortunes  quotations and jokes. eval: 7 of the topic files, calib: the others
  gcide     dictionary (Webster 1913, WordNet). eval: letters P and R, calib: the others
  debref    manual (the Debian Reference). eval: chapters 9 and 10, calib: the others
Composites: `mix` (all six, the default calibration), `fold-a` (austen, pycode, gcide),
`fold-b` (pydocs, fortunes, debref), or any comma-separated list of names. A calibration on
one fold and an evaluation on the other is the out-of-domain protocol (evals/suite.py).
Through `datasets` (needs the hub): wikitext2, c4, ptb. Or a path to a local text file.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

from quantkit.errors import QuantkitError

DATA = Path(__file__).parent / "data"
BUNDLED = ("austen", "pydocs", "pycode", "fortunes", "gcide", "debref")
COMPOSITES = {"mix": BUNDLED, "fold-a": ("austen", "pycode", "gcide"),
              "fold-b": ("pydocs", "fortunes", "debref")}
SPLITS = ("calib", "eval")

# name -> (dataset args, {split: hub split}, text field)
HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"calib": "train", "eval": "test"}, "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), {"calib": "train", "eval": "test"}, "sentence"),
    "c4": (("allenai/c4",), {"calib": "train", "eval": "validation"}, "text"),
}
C4_FILES = {"calib": "en/c4-train.00000-of-01024.json.gz",
            "eval": "en/c4-validation.00000-of-00008.json.gz"}


def corpus_names() -> list[str]:
    return [*BUNDLED, *COMPOSITES, *HUB]


def domains(name: str) -> tuple[str, ...]:
    """The single corpora a (possibly composite) dataset name stands for."""
    if name in COMPOSITES:
        return COMPOSITES[name]
    if "," in name:
        parts = tuple(p.strip() for p in name.split(",") if p.strip())
        return tuple(d for p in parts for d in domains(p))
    return (name,)


def load_text(name: str, split: str) -> str:
    """The text of corpus `name` for `split` ('calib' or 'eval'); documents joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if len(domains(name)) > 1:
        raise QuantkitError(f"{name!r} names several corpora {domains(name)}: take them one by one "
                            "(calibration mixes them itself)")
    if name in BUNDLED:
        with gzip.open(DATA / f"{name}_{split}.txt.gz", "rt", encoding="utf-8") as f:
            return f.read()
    if name in HUB:
        return _hub_text(name, split)
    if os.path.isfile(name):
        return Path(name).read_text(encoding="utf-8", errors="replace")
    raise QuantkitError(f"unknown dataset {name!r}: use one of {', '.join(corpus_names())} "
                        "or the path of a local text file")


def _hub_text(name: str, split: str) -> str:
    from datasets import load_dataset
    args, splits, field = HUB[name]
    kwargs = {"data_files": {splits[split]: C4_FILES[split]}} if name == "c4" else {}
    try:
        ds = load_dataset(*args, split=splits[split], **kwargs)
    except Exception as e:  # datasets raises many types when offline
        raise QuantkitError(f"could not load dataset {name!r} from the Hugging Face hub ({type(e).__name__}); "
                            "it needs network access (unset HF_DATASETS_OFFLINE), or use the bundled "
                            f"corpora: {', '.join(BUNDLED)}") from e
    texts = ds[field]
    if name == "c4":
        texts = texts[:3000 if split == "eval" else 20000]
    return "\n\n".join(texts)
