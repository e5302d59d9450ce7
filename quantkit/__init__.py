"""quantkit: post-training quantization and compression for Hugging Face models."""
from __future__ import annotations

import os

from quantkit.version import __version__
from quantkit.errors import QuantkitError
from quantkit.recipe import CalibConfig, EvalConfig, Recipe
from quantkit.types import LayerStats, QSpec
from quantkit.nn.hf import register as _register_with_transformers
from quantkit import calib  # noqa: F401  (quantkit.calib.distill)

_register_with_transformers()


def quantize(model, tokenizer=None, recipe=None, calib=None, progress: bool = True,
             overwrite: bool = False, resume: bool = False, **overrides):
    """Quantize a model; returns a Report (.model: the fake-quantized model, .save(dir)).

    model: an nn.Module already in memory (quantized in place; pass its tokenizer to calibrate
    on text or to save one), a local checkpoint directory, a hub id, a recipe name ("llama")
    or a Recipe. recipe: a Recipe or a recipe name/YAML path (default: the recipe of that
    name for a string model, Recipe() defaults otherwise). calib: calibration text (a string or
    a list of them) or token ids [n, seqlen], instead of the recipe's dataset. overrides: recipe
    fields, e.g. bits=3, method="rsq", alloc="ip", **{"calib.n_samples": 64}; out= saves there
    (an existing directory only with overwrite=True, and only an earlier output); resume=True
    continues an interrupted run to that out from its last finished block.
    An image classifier with BatchNorm (a module, a testbed name such as "resnet", or an
    image-classification checkpoint) takes calib= a float tensor of model inputs, or "zeroq" /
    "genie" (synthetic from its BN statistics), and act_bits= for activation quantization.

        report = quantkit.quantize(model, tokenizer, bits=4, method="gptq", calib=texts)
        report.save("out/model-w4")
        images = quantkit.calib.distill(cnn, method="genie", n=1024)
        report = quantkit.quantize(cnn, calib=images, bits=4, act_bits=4, method="genie-m")
    """
    from torch import nn
    from quantkit.pipeline import run
    from quantkit.recipe import load_recipe
    if isinstance(model, Recipe):
        recipe, model = model if recipe is None else recipe, None
    elif isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        recipe = load_recipe(name) if recipe is None else _recipe(recipe).with_overrides(model=name)
        model = None
    elif isinstance(model, nn.Module):
        recipe = _recipe(recipe)
    else:
        raise QuantkitError(f"quantize: model must be an nn.Module, a path, a hub id, a recipe name "
                            f"or a Recipe; got {type(model).__name__}")
    return run(_recipe(recipe).with_overrides(**overrides), progress, model=model,
               tokenizer=tokenizer, calib=calib, overwrite=overwrite, resume=resume)


def _recipe(recipe) -> Recipe:
    from quantkit.recipe import load_recipe
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(os.fspath(recipe))
    raise QuantkitError(f"quantize: recipe must be a Recipe or a recipe name; got {type(recipe).__name__}")


def __getattr__(name: str):
    # Report lives with the pipeline, which imports every method (and evals' corpora): loaded on
    # first use so that `import quantkit` from evals/ or a bench script has no import cycle.
    if name == "Report":
        from quantkit.pipeline import Report
        return Report
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


def load(path, device: str = "cpu", kernel: str = "auto", dtype=None, keep_packed: bool = False):
    """Load a quantkit checkpoint as a transformers model with QuantLinear layers (see serve.load);
    an image-model checkpoint as its fake-quantized model (image_run.load_image_checkpoint)."""
    from quantkit.image_run import is_image_checkpoint, load_image_checkpoint
    if is_image_checkpoint(os.fspath(path)):
        return load_image_checkpoint(os.fspath(path), "reference" if kernel == "reference" else "auto")[0]
    from quantkit.serve import load as _load
    return _load(path, device, kernel, dtype, keep_packed)


__all__ = ["quantize", "load", "Recipe", "Report", "QSpec", "LayerStats", "CalibConfig", "EvalConfig",
           "QuantkitError", "__version__"]
