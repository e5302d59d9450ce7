"""RSQ (Sung et al., "Rotate, Scale, then Quantize"): GPTQ on a rotated model with a
token-weighted Hessian H = X diag(w) Xᵀ / Σ w.

The compressor itself is GPTQ: what makes it RSQ happens before it is called. The pipeline
rotates the model (quant/rotation.py) and, block by block, weights each calibration token by
the attention it receives (stats/importance.py) while accumulating the one Hessian
(stats/hessian.py). With rotation off and uniform weights, RSQ is GPTQ bit for bit.
"""
from __future__ import annotations

from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.quant.base import LayerStats, QSpec
from quantkit.quant.gptq import gptq
from quantkit.quant.rotation import rotate_model
from quantkit.registry import register
from quantkit.stats.importance import TokenWeights, token_weighting


def _prepare(model, recipe) -> None:
    """Rotate before calibration: every statistic is then of the rotated model."""
    if recipe.rsq.rotate:
        rotate_model(model, recipe.rsq.seed, recipe.rsq.online_hadamard)


def _token_weights(recipe) -> TokenWeights:
    c = recipe.rsq
    return token_weighting(c.importance, c.r_min, c.r_max, c.first_n)


@register("compressor", "rsq", prepare=_prepare, token_weights=_token_weights,
          check=_token_weights)                    # check: an unknown importance fails early
def rsq(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """RSQ compressor: GPTQ's rounding with error feedback on the token-weighted Hessian."""
    if stats is None:
        raise QuantkitError("RSQ needs calibration statistics (a token-weighted Hessian)")
    return gptq(W, stats, spec)
