"""Named text corpora with fixed, disjoint calibration and evaluation parts.

Bundled (offline, built by evals/build_corpora.py from Debian packages):
  austen  calib: Sense and Sensibility, Emma, Mansfield Park, Northanger Abbey, Persuasion
          eval:  Pride and Prejudice
  pydocs  calib: the Python 3.11 library reference; eval: the tutorial and HOWTOs
Through `datasets` (needs the hub): wikitext2, c4, ptb. Or a path to a local text file.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

from quantkit.errors import QuantkitError

DATA = Path(__file__).parent / "data"
BUNDLED = ("austen", "pydocs")
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
    return [*BUNDLED, *HUB]


def load_text(name: str, split: str) -> str:
    """The text of corpus `name` for `split` ('calib' or 'eval'); documents joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
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
