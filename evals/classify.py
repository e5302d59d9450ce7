"""Classification metrics: logits in batches, top-k accuracy, and agreement with a reference."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from quantkit.errors import QuantkitError


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def logits(model: torch.nn.Module, x: Tensor, preprocess: Callable[[Tensor], Tensor],
           batch_size: int = 64) -> Tensor:
    """Float32 logits [N, classes] of model on preprocess(x), in eval mode without gradients."""
    if len(x) == 0:
        raise QuantkitError("logits() got no inputs: pass at least one image")
    was_training = model.training
    model.eval()
    device = _device(model)
    outs = []
    try:
        with torch.no_grad():
            for chunk in x.split(batch_size):
                out = model(preprocess(chunk).to(device))
                out = getattr(out, "logits", out)      # HF ImageClassifierOutput or a plain tensor
                outs.append(out.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fractions of rows whose label is among the k highest logits: {"top1": .., "top5": ..}."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise QuantkitError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match:"
                            " pass logits [N, classes] and labels [N]")
    classes = logits.shape[1]
    result = {}
    for k in ks:
        # With fewer than k classes, top-k means "all classes"; min keeps topk() valid.
        top = logits.topk(min(k, classes), dim=1).indices
        result[f"top{k}"] = (top == labels.to(top.device)[:, None]).any(dim=1).double().mean().item()
    return result


def agreement(logits_q: Tensor, logits_fp: Tensor) -> dict[str, float]:
    """How closely a quantized model's logits follow the full-precision ones (top-1/top-5, KL)."""
    if logits_q.shape != logits_fp.shape or logits_q.ndim != 2:
        raise QuantkitError(f"logits shapes differ: {tuple(logits_q.shape)} vs {tuple(logits_fp.shape)};"
                            " evaluate both models on the same inputs")
    q, fp = logits_q.double(), logits_fp.double()
    fp_top1 = fp.argmax(dim=1)
    q_top5 = q.topk(min(5, q.shape[1]), dim=1).indices
    log_p, log_q = fp.log_softmax(dim=1), q.log_softmax(dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return {"agreement_top1": (q.argmax(dim=1) == fp_top1).double().mean().item(),
            "agreement_top5": (q_top5 == fp_top1[:, None]).any(dim=1).double().mean().item(),
            "kl": kl.item()}
