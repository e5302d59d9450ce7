"""Token importance for RSQ: per-token weights w that turn the Hessian into X diag(w) Xᵀ.

`attention` (RSQ's AttnCon): run the block's own full-precision attention on its inputs (which
already carry upstream quantization) and score token j by the attention it receives,
s_j = Σ_heads Σ_queries A[h, i, j]; rescale per sequence to r ∈ [r_min, r_max] and w = r / mean(r).
`uniform` (w = 1: plain GPTQ) and `first_n` (only the first n tokens count) are the paper's
baselines. The weights are shared by every linear of the block.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.model.runner import BlockInputs, submodule_inputs

TokenWeights = Callable[[nn.Module, BlockInputs], list[Tensor]]   # (block, inputs) -> [B, T] per batch
IMPORTANCE = ("attention", "uniform", "first_n")


def rescale(s: Tensor, r_min: float, r_max: float) -> Tensor:
    """Per sequence (last dim): min-max map s onto [r_min, r_max], then divide by the mean."""
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    r = r_min + (s - lo) / (hi - lo).clamp_min(torch.finfo(s.dtype).tiny) * (r_max - r_min)
    return r / r.mean(-1, keepdim=True)


def _attention_module(block: nn.Module) -> nn.Module:
    attn = getattr(block, "self_attn", None)
    if attn is None:
        raise QuantkitError(f"attention importance: {type(block).__name__} has no self_attn module; "
                            "use rsq.importance: uniform | first_n")
    return attn


def _additive_causal(mask, T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The additive [.., T, T] mask eager attention needs (the captured one may be None under SDPA)."""
    if isinstance(mask, Tensor) and mask.dim() == 4:
        mask = mask[..., :T, :T]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask.to(dtype)
    full = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype, device=device)
    return full.triu(1)[None, None]


@torch.no_grad()
def attention_probs(block: nn.Module, inputs: BlockInputs, i: int) -> Tensor:
    """Attention probabilities [B, heads, T, T] of the block's own attention on batch i."""
    attn = _attention_module(block)
    args, kwargs = submodule_inputs(block, inputs, i, attn)
    hidden = args[0] if args else kwargs["hidden_states"]
    kwargs["attention_mask"] = _additive_causal(kwargs.get("attention_mask"), hidden.shape[1],
                                                hidden.dtype, hidden.device)
    config = attn.config
    before = config._attn_implementation
    config._attn_implementation = "eager"      # the only implementation that returns probabilities
    try:
        out = attn(*args, **kwargs)
    finally:
        config._attn_implementation = before
    return out[1]


def attention_weights(r_min: float = 0.005, r_max: float = 1.0) -> TokenWeights:
    """RSQ's AttnCon weights: attention each token receives, summed over heads and queries."""
    def weights(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
        out = []
        for i in range(len(inputs.hidden)):
            s = attention_probs(block, inputs, i).float().sum(dim=(1, 2))   # [B, T]
            out.append(rescale(s, r_min, r_max))
        return out
    return weights


def uniform_weights() -> TokenWeights:
    """Every token counts once (RSQ then equals GPTQ on the same model)."""
    return lambda _block, inputs: [torch.ones(h.shape[:2], device=h.device) for h in inputs.hidden]


def first_n_weights(n: int) -> TokenWeights:
    """Only the first n tokens of each sequence count (the paper's position heuristic)."""
    def weights(_block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
        out = []
        for h in inputs.hidden:
            w = torch.zeros(h.shape[:2], device=h.device)
            w[:, :n] = 1
            out.append(w / w.mean(-1, keepdim=True))
        return out
    return weights


def token_weighting(kind: str, r_min: float = 0.005, r_max: float = 1.0, first_n: int = 64) -> TokenWeights:
    """The token-weight function named `kind` (attention | uniform | first_n)."""
    if kind == "attention":
        if not 0 <= r_min <= r_max or r_max <= 0:
            raise QuantkitError(f"rsq: need 0 <= r_min <= r_max and r_max > 0, got {r_min}, {r_max}")
        return attention_weights(r_min, r_max)
    if kind == "uniform":
        return uniform_weights()
    if kind == "first_n":
        if first_n < 1:
            raise QuantkitError(f"rsq.first_n must be >= 1, got {first_n}")
        return first_n_weights(first_n)
    raise QuantkitError(f"unknown rsq.importance {kind!r}; choose one of: {', '.join(IMPORTANCE)}")
