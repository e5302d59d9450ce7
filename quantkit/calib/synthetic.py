"""distill(model, method, n): a synthetic calibration set from the model's BatchNorm statistics."""
from __future__ import annotations

from torch import Tensor, nn

from quantkit import registry
from quantkit.calib import genie, zeroq  # noqa: F401  (they register themselves)
from quantkit.model.convnet import input_shape
from quantkit.recipe import build_config


def distill(model: nn.Module, method: str = "genie", n: int = 1024, seed: int = 0,
            size: int | None = None, progress: bool = True, history: list | None = None,
            **options) -> Tensor:
    """n synthetic inputs for `model` (in its input space) by `method` (zeroq | genie);
    options: the method's settings (iterations, batch_size, lr...)."""
    fn, hooks = registry.get("calib", method), registry.hooks("calib", method)
    config = build_config(hooks.config, options, method)
    return fn(model, n, input_shape(model, size), seed=seed, config=config, progress=progress,
              history=history)
