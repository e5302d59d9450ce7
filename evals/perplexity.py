"""Perplexity by the standard protocol (GPTQ/AWQ): join, tokenize once, non-overlapping windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one row of token ids [1, N]."""
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int, max_windows: int | None = None,
               bos_id: int | None = None, progress: bool = True, spread: bool = False) -> dict:
    """exp(mean NLL per predicted token) over floor(N / seqlen) windows; the tail is dropped.

    With `bos_id` (models that need BOS), each window is BOS + seqlen-1 text tokens.
    max_windows keeps the first ones, or with `spread` that many evenly spaced over the text
    (a sample of the whole text rather than of its first chapter).
    """
    step = seqlen - 1 if bos_id is not None else seqlen
    total_windows = ids.shape[1] // step
    if total_windows == 0:
        raise ValueError(f"text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    n = min(total_windows, max_windows) if max_windows else total_windows
    starts = (torch.linspace(0, total_windows - 1, n).round().long().tolist() if spread
              else list(range(n)))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        x = ids[:, i * step:(i + 1) * step]
        if bos_id is not None:
            x = torch.cat([torch.tensor([[bos_id]]), x], dim=1)
        x = x.to(device)
        logits = model(x).logits.float()
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": n}


def eval_ids_with_baseline(recipe, max_windows: int | None, results: dict) -> Tensor:
    """Token ids of the recipe's eval text; results["fp32"] gets the original model's perplexity
    on them unless it is there already (benches that accumulate rows across runs)."""
    from evals.data import load_text
    from quantkit.model.loader import load_model
    model, tok, _ = load_model(recipe.model)
    ids = tokenize(tok, load_text(recipe.eval.dataset, "eval"))
    if "fp32" not in results:
        results["fp32"] = perplexity(model, ids, recipe.eval.seqlen, max_windows, progress=False)
    return ids
