"""RSQ (Sung et al., "Rotate, Scale, then Quantize"): GPTQ on a rotated model with a
token-weighted Hessian H = X diag(w) Xᵀ / Σ w.

The compressor itself is GPTQ: what makes it RSQ happens before it is called. The pipeline
rotates the model (quant/rotation.py) and, block by block, weights each calibration token by
the attention it receives (stats/importance.py) while accumulating the one Hessian
(stats/hessian.py). With rotation off and uniform weights, RSQ is GPTQ bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.quant.base import LayerStats, QSpec
from quantkit.quant.gptq import gptq
from quantkit.quant.rotation import check_rotatable, rotate_block, rotate_model
from quantkit.registry import register
from quantkit.stats.importance import TokenWeights, token_weighting


@dataclass
class RSQConfig:
    """The recipe's `rsq:` section: rotation, then GPTQ on a token-importance-weighted Hessian."""
    rotate: bool = True             # QuaRot-style: fuse RMSNorms, random Hadamard on residual + heads
    online_hadamard: bool = True    # rotate: also a run-time Hadamard on down_proj's input (as the paper)
    residual: bool = True           # rotate the residual stream (unties lm_head); false: no residual
                                    # rotation, an online Hadamard on every block linear's input instead
                                    # (online_hadamard then has no effect; the run can stream)
    importance: str = "attention"   # attention | uniform | first_n: how tokens are weighted
    r_min: float = 0.005            # attention: importance rescaled per sequence to [r_min, r_max]
    r_max: float = 1.0
    first_n: int = 64               # first_n: tokens (from the start of each window) that count
    seed: int = 0                   # seed of the random Hadamard signs


def _prepare(model, recipe) -> None:
    """Rotate before calibration: every statistic is then of the rotated model."""
    c = recipe.section("rsq", RSQConfig)
    if c.rotate:
        rotate_model(model, c.seed, c.online_hadamard, c.residual)


def _prepare_block(recipe):
    """Without the residual rotation each block is rotated on its own: a streamed run does it
    to each block as it reads it (the same weights as _prepare's, block for block)."""
    c = recipe.section("rsq", RSQConfig)
    if c.rotate and c.residual:
        return None

    def prepare(model, block, index: int, first: bool) -> None:
        if c.rotate:
            check_rotatable(model)
            rotate_block(block, c.seed, index, hooks=first)
    return prepare


def _token_weights(recipe) -> TokenWeights:
    c = recipe.section("rsq", RSQConfig)
    return token_weighting(c.importance, c.r_min, c.r_max, c.first_n)


@register("compressor", "rsq", section="rsq", config=RSQConfig, prepare=_prepare,
          prepare_block=_prepare_block, token_weights=_token_weights, check=_token_weights)   # check: a bad importance fails early
def rsq(W: Tensor, stats: LayerStats | None, spec: QSpec) -> PackedLinear:
    """RSQ compressor: GPTQ's rounding with error feedback on the token-weighted Hessian."""
    if stats is None:
        raise QuantkitError("RSQ needs calibration statistics (a token-weighted Hessian)")
    return gptq(W, stats, spec)
