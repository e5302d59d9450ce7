"""The one Hessian accumulator: H = mean over tokens of x xᵀ (fp32), optionally token-weighted."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.quant.base import LayerStats


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
        """LayerStats with the normalised H."""
        if self.n == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        cross = None if self.cross is None else self.cross / self.weight
        return LayerStats(H=self.sum / self.weight, n=self.n, act_absmax=self.absmax, cross=cross)
