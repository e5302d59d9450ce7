"""MiniLM-L6 (BERT encoder, fp32 weights): RTN vs GPTQ at 4 and 3 bits, sentence-embedding fidelity.

    python bench/encoder.py

Quality = cosine similarity of mean-pooled sentence embeddings to the fp32 model's, on 256
held-out sentences of Pride and Prejudice (calibration uses the other novels), and how often
each sentence's nearest neighbour among the others stays the same.
Writes bench/results/encoder.json.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evals.data import load_text  # noqa: E402
from quantkit.model.loader import load_model  # noqa: E402
from quantkit.pipeline import run  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from results_io import default_path, save_rows  # noqa: E402


def sentences(n: int) -> list[str]:
    text = re.sub(r"\s+", " ", load_text("austen", "eval"))
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s) < 300]
    return out[:: max(1, len(out) // n)][:n]


@torch.no_grad()
def embed(model, tok, sents: list[str]) -> torch.Tensor:
    embs = []
    for i in range(0, len(sents), 32):
        enc = tok(sents[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        embs.append((h * m).sum(1) / m.sum(1))
    return torch.nn.functional.normalize(torch.cat(embs), dim=-1)


def nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.argmax(1)


def main() -> None:
    sents = sentences(256)
    model, tok, _ = load_model("minilm-l6")
    ref = embed(model, tok, sents)
    base = load_recipe("minilm")
    results = {"sentences": len(sents)}
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            rep = run(base.with_overrides(bits=bits, method=method, out=None), progress=False)
            e = embed(rep.model, tok, sents)
            cos = (e * ref).sum(-1)
            res = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                   "nn_agreement": float((nearest(e) == nearest(ref)).float().mean()),
                   "bits_per_weight": rep.bits_per_weight, "seconds": rep.seconds}
            results[f"{method} w{bits} g{base.group_size}"] = res
            print(f"{method} w{bits}: cos {res['cos_mean']:.4f} (min {res['cos_min']:.4f}) "
                  f"nn-agreement {res['nn_agreement']:.3f}", flush=True)
    save_rows(default_path(__file__), results, __file__, merge=False)


if __name__ == "__main__":
    main()
