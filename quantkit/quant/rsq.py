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
from quantkit.registry import register


@register("compressor", "rsq")
def rsq(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """RSQ compressor: GPTQ's rounding with error feedback on the token-weighted Hessian."""
    if stats is None:
        raise QuantkitError("RSQ needs calibration statistics (a token-weighted Hessian)")
    return gptq(W, stats, spec)
