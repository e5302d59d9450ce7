"""Recipes for image classifiers: where the model and its images come from (a named testbed, a
HF image-classification checkpoint, or a module passed in), the recipe-driven run, and loading
a saved image checkpoint back. pipeline.run hands a recipe here when this runner claims it."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from quantkit import registry
from quantkit.errors import QuantkitError
from quantkit.formats.io import check_output, read_config_json
from quantkit.image import BIAS, CHECKPOINT_FILE, ImageReport, quantize_image_model
from quantkit.recipe import Recipe

Preprocess = Callable[[Tensor], Tensor]
IMAGE_ARCHITECTURES = ("ForImageClassification",)


def _testbeds() -> dict:
    from evals.testbeds import TESTBEDS
    return TESTBEDS


def is_image_source(name: str) -> bool:
    """A named image testbed, or a checkpoint directory of an image-classification model."""
    if name in _testbeds():
        return True
    cfg = Path(name).expanduser() / "config.json"
    if cfg.is_file():
        archs = read_config_json(cfg.parent).get("architectures") or []
        return any(a.endswith(IMAGE_ARCHITECTURES) for a in archs)
    return (Path(name) / CHECKPOINT_FILE).is_file()


def _hf_preprocess(source: str) -> Preprocess:
    """x uint8 [n, c, h, w] -> (x/255 − mean)/std with the checkpoint's processor settings."""
    p = Path(source) / "preprocessor_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    mean = torch.tensor(cfg.get("image_mean", [0.5])).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("image_std", [0.5])).view(1, -1, 1, 1)
    return lambda x: (x.float() / 255 - mean) / std


def load_source(name: str) -> tuple[nn.Module, Preprocess, dict]:
    """(fp model in eval mode, its preprocessing, the testbed entry or {}) for a source name."""
    beds = _testbeds()
    if name in beds:
        model, pre = beds[name]["load"]()
        return model.eval(), pre, beds[name]
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise QuantkitError(f"{name}: not an image testbed ({', '.join(beds)}) nor a checkpoint "
                            "directory with config.json")
    import transformers
    archs = read_config_json(p).get("architectures") or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise QuantkitError(f"{name}: architecture {archs} is not in this transformers")
    return cls.from_pretrained(str(p)).eval(), _hf_preprocess(str(p)), {}


def calibration(recipe: Recipe, model: nn.Module, pre: Preprocess, bed: dict) -> Tensor | str:
    """What to calibrate on: 'zeroq' / 'genie' (distilled later), the testbed's own real images
    ('real'), or an image folder ('imagefolder:PATH'), preprocessed for the model."""
    ds = recipe.calib.dataset
    if ds in registry.names("calib"):
        return ds
    if ds == "real":
        if "calib_data" not in bed:
            raise QuantkitError(f"--calib real: {recipe.model} has no bundled images; "
                                "use imagefolder:PATH, zeroq or genie")
        return pre(bed["calib_data"](recipe.calib.n_samples, recipe.seed))
    if ds.startswith("imagefolder:"):
        from evals.images import imagefolder
        size = _input_size(model)
        x, _ = imagefolder(ds.split(":", 1)[1], size)
        return pre(x[:recipe.calib.n_samples])
    raise QuantkitError(f"--calib {ds!r} for an image model: use zeroq | genie (no data), real "
                        "(the testbed's own images) or imagefolder:PATH")


def _input_size(model: nn.Module) -> int:
    from quantkit.model.convnet import input_shape
    return input_shape(model)[1]


def run_image(recipe: Recipe, progress: bool = True, model: nn.Module | None = None,
              calib=None, overwrite: bool = False) -> ImageReport:
    """Quantize the recipe's image model (or `model`, in place) and save it to recipe.out."""
    if recipe.out:
        check_output(recipe.out, overwrite)
    if model is None:
        model, pre, bed = load_source(recipe.model)
    else:
        pre, bed = (lambda x: x), {}
    if calib is None:
        calib = calibration(recipe, model, pre, bed)
    section = recipe.sections.get(calib if isinstance(calib, str) else "", {})
    if recipe.alloc != "uniform" and recipe.sensitivity != "kl":
        raise QuantkitError(f"--sensitivity {recipe.sensitivity}: image models price layers by "
                            "ZeroQ's KL on the calibration images; use --sensitivity kl")
    try:
        options = [int(b) for b in recipe.bit_options]
    except ValueError:
        raise QuantkitError(f"--bit-options {recipe.bit_options}: image models take widths "
                            "(per output channel), e.g. 2,4,8") from None
    report = quantize_image_model(
        model, calib, bits=recipe.bits, act_bits=recipe.act_bits, method=recipe.method,
        alloc=recipe.alloc, bit_options=options,
        n_calib=recipe.calib.n_samples, batch_size=recipe.calib.batch_size, seed=recipe.seed,
        max_bops=recipe.max_bops, bn_reestimate=recipe.bn_reestimate,
        bias_correction=recipe.bias_correction,
        calib_options=section, method_options=recipe.sections.get(recipe.method.replace("-", "_"), {}),
        progress=progress)
    report.source = recipe.model
    report.recipe = asdict(recipe) | recipe.sections
    if recipe.out:
        report.save(recipe.out, overwrite)
    return report


def claims(recipe: Recipe, model: nn.Module | None) -> bool:
    """This runner takes image models: a module with a Conv2d and no repeated linear blocks
    of a language model, or a recipe whose model is an image source."""
    if model is not None:
        from quantkit.model.discovery import find_blocks
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return False
        try:
            find_blocks(model)
            return False
        except QuantkitError:
            return True
    return is_image_source(recipe.model)


run_image.claims = claims
registry.register("runner", "image")(run_image)


def is_image_checkpoint(path: str) -> bool:
    return (Path(path) / CHECKPOINT_FILE).is_file()


def load_image_checkpoint(path: str, kernel: str = "auto") -> tuple[nn.Module, Preprocess, dict, dict]:
    """(quantized model, preprocessing, testbed entry, manifest) of a saved image checkpoint:
    the architecture rebuilt from its source, BN folded, weights and activation grids set.
    kernel "auto": W8A8 layers run on the int8 kernel (kernels/int8_act.py) where it applies;
    "reference": every layer as fake-quantized float."""
    if kernel not in ("auto", "reference"):
        raise QuantkitError(f"kernel {kernel!r}: image checkpoints take auto | reference")
    from safetensors.torch import load_file
    from quantkit.formats.packed import PackedLinear
    from quantkit.kernels import int8_act
    from quantkit.model.convnet import fold_batchnorm, groups, input_shape, trace
    from quantkit.quant.act import attach_input_quantizers
    p = Path(path)
    try:
        meta = json.loads((p / CHECKPOINT_FILE).read_text())
        tensors = load_file(str(p / "quantized.safetensors"))
    except (OSError, ValueError) as e:
        raise QuantkitError(f"{path}: unreadable image checkpoint ({type(e).__name__}: {e}); "
                            "re-run quantkit quantize") from e
    model, pre, bed = load_source(meta["source"])
    fold_batchnorm(model, trace(model, torch.zeros(1, *input_shape(model))))
    acts = meta["activations"]
    quantizers = attach_input_quantizers(model, {n: a["bits"] for n, a in acts.items()})
    with torch.no_grad():
        for n, q in quantizers.items():
            q.signed, q.enabled = acts[n]["signed"], True
            q.scale.copy_(tensors[f"{n}.input_scale"][0])
        for n, layer in meta["layers"].items():
            own = {k[len(n) + 1:]: v for k, v in tensors.items()
                   if k.startswith(n + ".") and k not in (f"{n}.input_scale", f"{n}.{BIAS}")}
            pl = PackedLinear(layer["format"], tuple(layer["shape"]), own, layer["meta"])
            mod = model.get_submodule(n)
            mod.weight.copy_(pl.dequantize().reshape(mod.weight.shape))
            if f"{n}.{BIAS}" in tensors:
                mod.bias = nn.Parameter(tensors[f"{n}.{BIAS}"].to(mod.weight), requires_grad=False)
            if kernel == "auto" and n in quantizers and groups(mod) == 1 and \
                    int8_act.supports(pl, quantizers[n].bits):
                int8_act.install(mod, pl)
    return model.eval(), pre, bed, meta


def evaluate_image(target: str, dataset: str | None = None, batch_size: int = 64) -> dict:
    """Top-1 / top-5 on the testbed's labelled test set (and agreement with fp32), or on
    unlabelled images (imagefolder:PATH, photos) top-1/top-5 agreement and KL vs fp32."""
    from evals.classify import agreement, logits, topk_accuracy
    if is_image_checkpoint(target):
        model, pre, bed, meta = load_image_checkpoint(target)
        fp, _, _ = load_source(meta["source"])
    else:
        model, pre, bed = load_source(target)
        fp = None
    if dataset:
        from evals.images import imagefolder, parse_dataset
        kind, arg = parse_dataset(dataset)
        if kind != "imagefolder":
            raise QuantkitError(f"--dataset {dataset}: image models take imagefolder:PATH")
        x, labels = imagefolder(arg, _input_size(model))
    else:
        if "eval_data" not in bed:
            raise QuantkitError(f"{target}: no bundled test set; pass --dataset imagefolder:PATH")
        x, labels = bed["eval_data"]()
    out = logits(model, x, pre, batch_size)
    res = {"target": target, "images": len(x), "dataset": dataset or "testbed"}
    if labels is not None:
        res.update(topk_accuracy(out, labels))
    if fp is not None:
        ref = logits(fp, x, pre, batch_size)
        res.update(agreement(out, ref))
        if labels is not None:
            res["fp32"] = topk_accuracy(ref, labels)
    return res
