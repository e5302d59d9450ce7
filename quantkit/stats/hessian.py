"""The one Hessian accumulator: H = mean over tokens of x xᵀ (fp32), optionally token-weighted."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.model.discovery import linears, weight_matrix
from quantkit.model.runner import BlockInputs, hook_leads, run_until_stop
from quantkit.types import LayerStats


def proxy_loss(E: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ): the layer's output error on the calibration inputs (H = mean x xᵀ)."""
    return float(((E @ H) * E).sum())


class HessianAccumulator:
    """Accumulates Σ w_t x_t x_tᵀ and Σ w_t over calibration tokens.

    `finalize` returns H = Σ w x xᵀ / Σ w: the (weighted) mean second moment. GPTQ's codes do
    not depend on the overall scale of H; the normalisation makes H comparable across
    layers and calibration set sizes (sensitivities use it).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.weight = 0.0
        self.n = 0
        self.cross: Tensor | None = None
        self.absmax = torch.zeros(dim, dtype=torch.float32, device=device)

    def add(self, x: Tensor, token_weight: Tensor | None = None, x_ref: Tensor | None = None) -> None:
        """Add activations x [..., dim]; token_weight [...] scales each token's contribution.

        x_ref: the same tokens' inputs in the unquantized model; accumulates Σ w x_ref xᵀ so
        that a compressor can aim at the full-precision outputs.
        """
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.n += x.shape[0]
        if token_weight is None:
            self.weight += x.shape[0]
        else:
            w = token_weight.reshape(-1).to(x)
            self.weight += float(w.sum())
            x = x * w.sqrt()[:, None]
            if x_ref is not None:
                x_ref = x_ref.reshape(x.shape).to(x) * w.sqrt()[:, None]
        self.sum.addmm_(x.t(), x)
        if x_ref is not None:
            x_ref = x_ref.reshape(x.shape).to(x)
            if self.cross is None:
                self.cross = torch.zeros_like(self.sum)
            self.cross.addmm_(x_ref.t(), x)

    def finalize(self) -> LayerStats:
        """LayerStats with the normalised H (normalised in place: the accumulator is spent)."""
        if self.n == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        if self.weight is None:
            raise RuntimeError("finalize() was already called on this accumulator")
        cross = None if self.cross is None else self.cross.div_(self.weight)
        stats = LayerStats(H=self.sum.div_(self.weight), n=self.n, act_absmax=self.absmax, cross=cross)
        self.weight = None
        return stats


class GroupedHessian:
    """One H per group of a grouped (e.g. depthwise) conv, accumulated in one batched product:
    x [groups, tokens, dim] -> H_g = mean over tokens of x_g x_gᵀ."""

    def __init__(self, groups: int, dim: int):
        self.sum = torch.zeros(groups, dim, dim)
        self.absmax = torch.zeros(groups, dim)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(1))
        self.n += x.shape[1]
        self.sum.baddbmm_(x.transpose(1, 2), x)

    def finalize(self) -> list[LayerStats]:
        if self.n == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return [LayerStats(H=h / self.n, n=self.n, act_absmax=a)
                for h, a in zip(self.sum, self.absmax)]


@torch.no_grad()
def collect_hessians(block: nn.Module, inputs: BlockInputs, groups: list[list[str]],
                     reference: tuple[nn.Module, BlockInputs] | None = None,
                     stop_early: bool = True, token_weights: list[Tensor] | None = None
                     ) -> dict[str, HessianAccumulator]:
    """One Hessian per input group (keyed by its first linear), over all batches.

    With `reference` = (unquantized block, its inputs in the unquantized model), the same
    tokens' full-precision layer inputs are accumulated against the actual ones too.
    With `stop_early`, each forward ends after the last group's inputs are seen.
    token_weights: per batch a [batch, seq] tensor weighting each token (RSQ), same for all groups.
    """
    mods = linears(block)
    accs = {g[0]: HessianAccumulator(weight_matrix(mods[g[0]]).shape[1], inputs.hidden[0].device)
            for g in groups}
    ref_x: dict[str, Tensor] = {}
    batch = [0]   # index of the batch being run, for the hooks

    def add(n: str, x: Tensor) -> None:
        w = None if token_weights is None else token_weights[batch[0]]
        accs[n].add(x, token_weight=w, x_ref=ref_x.pop(n, None))

    handles = hook_leads(block, groups, add, stop_early)
    if reference is not None:
        handles += hook_leads(reference[0], groups, ref_x.__setitem__, stop_early)
    try:
        for i in range(len(inputs.hidden)):
            batch[0] = i
            if reference is not None:
                run_until_stop(reference[0], reference[1], i)
            run_until_stop(block, inputs, i)
    finally:
        for h in handles:
            h.remove()
    return accs
