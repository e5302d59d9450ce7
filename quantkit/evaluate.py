"""Perplexity of what a user points at: a quantkit output, an original checkpoint or a recipe's
model, on one corpus or on the eval suite (each domain as a ratio to the fp32 original)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from evals.data import domains, load_text
from quantkit.errors import QuantkitError
from quantkit.formats.io import is_quantkit_checkpoint, read_manifest
from quantkit.model.loader import load_model, resolve_source
from quantkit.recipe import EvalConfig, find_recipe, load_recipe
from quantkit.serve import load


def require_causal(model: nn.Module) -> None:
    """Perplexity needs next-token logits: a clear error for encoders and other heads."""
    if not any(k in type(model).__name__ for k in ("CausalLM", "LMHead")):
        raise QuantkitError(f"perplexity needs a causal language model, not {type(model).__name__}")


def text_perplexity(model: nn.Module, tokenizer, text: str, seqlen: int,
                    max_windows: int | None) -> dict:
    """Perplexity on one text (BOS on every window for the models that expect it)."""
    from evals.perplexity import perplexity, tokenize
    from evals.suite import needs_bos
    require_causal(model)
    bos = tokenizer.bos_token_id if needs_bos(model) else None
    with torch.no_grad():
        return perplexity(model, tokenize(tokenizer, text), seqlen, max_windows, bos_id=bos)


def suite_perplexity(model: nn.Module, tokenizer, dataset: str, source: str | None,
                     seqlen: int | None = None, windows: int | None = None) -> dict:
    """The suite on `dataset`'s domains; with `source` (the original) each as a ratio to fp32."""
    from evals.suite import SEQLEN, WINDOWS, suite
    require_causal(model)
    with torch.no_grad():
        return suite(model, tokenizer, dataset, seqlen or SEQLEN, windows or WINDOWS, source)


def evaluate_target(target: str, dataset: str | None = None, seqlen: int | None = None,
                    max_windows: int | None = None, device: str = "cpu",
                    kernel: str = "reference") -> dict:
    """Perplexity of a quantkit output, an original checkpoint / hub id, or a recipe's model.

    One corpus or file: its perplexity ("ppl"). No dataset (the recipe's) or a composite (mix,
    fold-a, a,b): the suite, as suite_perplexity gives it ("suite": True)."""
    from transformers import AutoTokenizer
    is_recipe = find_recipe(target) is not None and not Path(target).is_dir()
    ev = load_recipe(target).eval if is_recipe else EvalConfig()
    dataset = dataset or ev.dataset
    texts = [load_text(d, "eval") for d in domains(dataset)]      # fail before loading the model
    if is_quantkit_checkpoint(target):
        model = load(target, device=device, kernel=kernel)
        tokenizer = AutoTokenizer.from_pretrained(target)
        source = read_manifest(target).get("source")
    else:
        model, tokenizer, _ = load_model(load_recipe(target).model if is_recipe else target, device)
        source = None                                        # the original itself: ratios are 1
    if len(texts) == 1:
        res = text_perplexity(model, tokenizer, texts[0], seqlen or ev.seqlen,
                              max_windows or ev.max_windows)
        return {"target": target, **res, "dataset": dataset, "seqlen": seqlen or ev.seqlen}
    res = suite_perplexity(model, tokenizer, dataset, resolve_source(source) if source else None,
                           seqlen, max_windows)
    return {"target": target, "suite": True, **res}
