"""quantkit: post-training quantization and compression for Hugging Face models."""
from __future__ import annotations

__version__ = "0.1.0"

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402
from quantkit.nn.hf import register as _register_with_transformers  # noqa: E402

_register_with_transformers()


def quantize(recipe: Recipe, progress: bool = True):
    """Run the pipeline for a Recipe; returns a Report (with .model, the fake-quantized model)."""
    from quantkit.pipeline import run
    return run(recipe, progress)


def load(path, device: str = "cpu", kernel: str = "auto", dtype=None, keep_packed: bool = False):
    """Load a quantkit checkpoint as a transformers model with QuantLinear layers (see serve.load)."""
    from quantkit.serve import load as _load
    return _load(path, device, kernel, dtype, keep_packed)


__all__ = ["Recipe", "QuantkitError", "quantize", "load", "__version__"]
