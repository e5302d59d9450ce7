"""Hutchinson trace estimation: Tr(H) ≈ mean of vᵀHv over Rademacher vectors v."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hutchinson_trace(matvec: Callable[[Tensor], Tensor], dim: int, tol: float = 1e-3,
                     min_samples: int = 1, max_samples: int = 1000,
                     generator: torch.Generator | None = None) -> tuple[float, int]:
    """(estimate, samples used): stop once the running mean changes by less than tol (relative)."""
    total, mean = 0.0, None
    for k in range(1, max_samples + 1):
        v = torch.randint(0, 2, (dim,), generator=generator).double() * 2 - 1
        total += float(v @ matvec(v))
        new = total / k
        if mean is not None and k >= min_samples and abs(new - mean) <= tol * abs(mean):
            return new, k
        mean = new
    return mean, k


def loss_hessian_traces(model: nn.Module, ids: Tensor, names: list[str], tol: float = 1e-3,
                        max_samples: int = 50, seed: int = 0) -> dict[str, float]:
    """Per-layer Tr(∂²loss/∂W²) of the next-token loss by Hutchinson with double backprop.

    One Rademacher vector over all the named weights per sample: the block of Hv that
    belongs to a layer, dotted with that layer's part of v, estimates that layer's trace.
    """
    params = [model.get_submodule(n).weight for n in names]
    was = [p.requires_grad for p in params]
    # fused attention kernels have no double backward: use the eager path meanwhile
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    try:
        logits = model(ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sums, est = [0.0] * len(params), [None] * len(params)
        for k in range(1, max_samples + 1):
            vs = [torch.randint(0, 2, p.shape, generator=g).to(p) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            new = []
            for i, (v, h) in enumerate(zip(vs, hv)):
                sums[i] += float((v * h).sum())
                new.append(sums[i] / k)
            done = k > 1 and all(abs(n - e) <= tol * abs(e) for n, e in zip(new, est))
            est = new
            if done:
                break
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
        if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
    return dict(zip(names, est))
