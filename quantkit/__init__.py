"""quantkit: post-training quantization and compression for Hugging Face models."""
from __future__ import annotations

__version__ = "0.1.0"

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402


def quantize(recipe: Recipe, progress: bool = True):
    """Run the pipeline for a Recipe; returns a Report (with .model, the fake-quantized model)."""
    from quantkit.pipeline import run
    return run(recipe, progress)


def load(path, device: str = "cpu", kernel: str = "auto"):
    """Load a quantkit checkpoint as a transformers model with QuantLinear layers."""
    from quantkit.serve import load as _load
    return _load(path, device, kernel)


__all__ = ["Recipe", "QuantkitError", "quantize", "load", "__version__"]
