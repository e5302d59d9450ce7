"""Image classifiers with BatchNorm: calibration images (real, or distilled from the BN statistics
with no data at all), BN folding, weight and activation quantization unit by unit (a per-layer
compressor such as RTN / GPTQ, or a reconstruction method such as Genie-M), one report.

    images = quantkit.calib.distill(model, method="genie", n=1024)
    report = quantize_image_model(model, calib=images, bits=4, act_bits=4, method="genie-m")
"""
from __future__ import annotations

import copy
import json
import platform
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit import registry
from quantkit.calib.synthetic import distill
from quantkit.errors import QuantkitError
from quantkit.formats.io import atomic_dir
from quantkit.alloc import ip, pareto  # noqa: F401  (they register themselves)
from quantkit.alloc.table import CostTable
from quantkit.formats.packed import PackedLinear
from quantkit.model.convnet import fold_batchnorm, trace, units
from quantkit.quant import genie_m, gptq, rtn  # noqa: F401  (they register themselves)
from quantkit.quant.act import ActQuantizer
from quantkit.quant.convnet import (bias_correct, compress_layer, default_plan, quantize_convnet,
                                    reestimate_bn)
from quantkit.recipe import build_config
from quantkit.types import QSpec
from quantkit.version import __version__

CHECKPOINT_FILE = "quantkit_image.json"
BIAS = "bn_bias"            # a layer's bias after bias correction / BN re-estimation (else the folded source's)
WEIGHTS_FILE = "quantized.safetensors"


@dataclass
class ImageReport:
    """What an image-model run gives back; `model` is the quantized (fake-quant) model."""
    method: str
    calib: str
    bits: float
    act_bits: int | None
    seconds: float
    calib_seconds: float
    bits_per_weight: float
    n_layers: int
    settings: dict = field(default_factory=dict)
    original_size_bytes: int = 0        # fp32 parameters of the original model
    size_bytes: int = 0                 # saved checkpoint (0 until saved)
    out: str | None = None
    source: str = ""                    # what to rebuild the architecture from when loading
    recipe: dict = field(default_factory=dict, repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    packed: dict[str, PackedLinear] = field(default_factory=dict, repr=False)
    quantizers: dict[str, ActQuantizer] = field(default_factory=dict, repr=False)
    biases: dict[str, Tensor] = field(default_factory=dict, repr=False)   # re-estimated (BN)

    def to_dict(self) -> dict:
        keys = ("method", "calib", "bits", "act_bits", "seconds", "calib_seconds",
                "bits_per_weight", "n_layers", "settings", "original_size_bytes", "size_bytes",
                "out", "source")
        return {k: getattr(self, k) for k in keys}

    def save(self, out: str | Path, overwrite: bool = False) -> "ImageReport":
        """Packed weights, activation scales and the run record, written atomically (an
        existing `out` is replaced only with overwrite=True)."""
        from safetensors.torch import save_file
        tensors = {f"{n}.{k}": v.contiguous() for n, p in self.packed.items()
                   for k, v in p.tensors.items()}
        tensors.update({f"{n}.input_scale": q.scale.detach().reshape(1)
                        for n, q in self.quantizers.items()})
        tensors.update({f"{n}.{BIAS}": b.detach().float().contiguous() for n, b in self.biases.items()})
        layers = {n: {"format": p.format, "shape": list(p.shape), "meta": p.meta}
                  for n, p in self.packed.items()}
        acts = {n: {"bits": q.bits, "signed": q.signed} for n, q in self.quantizers.items()}
        self.out = str(out)
        with atomic_dir(out, overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CHECKPOINT_FILE).write_text(json.dumps(
                {"source": self.source, "layers": layers, "activations": acts,
                 "run": self.to_dict(), "recipe": self.recipe,
                 "versions": {"quantkit": __version__, "torch": torch.__version__,
                              "python": platform.python_version()}}, indent=2, default=str))
            self.size_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
        return self


def calibration_images(model: nn.Module, calib: Tensor | str, n: int, seed: int,
                       options: dict | None = None, progress: bool = True) -> Tensor:
    """Model inputs to calibrate on: `calib` itself (a tensor), or n images distilled from the
    model's BatchNorm statistics by the named method (zeroq | genie)."""
    if isinstance(calib, Tensor):
        if calib.dim() != 4 or not calib.is_floating_point():
            raise QuantkitError("calibration images: expected a float tensor [n, channels, h, w] "
                                "in the model's input space (preprocessed)")
        return calib
    if calib not in registry.names("calib"):
        raise QuantkitError(f"--calib {calib!r}: use {' | '.join(registry.names('calib'))} "
                            "(data-free) or pass real images")
    return distill(model, calib, n, seed, progress=progress, **(options or {}))


@torch.no_grad()
def kl_table(model: nn.Module, layers: list[str], options: list[int], x: Tensor,
             batch_size: int = 64) -> CostTable:
    """ZeroQ's sensitivity: cost[l, o] = mean KL(M(x) ‖ M with only layer l's weights RTN-
    quantized at options[o] bits, per output channel); size = weights x bits + scale/zero."""
    def log_probs(m: nn.Module) -> Tensor:
        out = [_logits(m(b)) for b in x.split(batch_size)]
        return torch.log_softmax(torch.cat(out).float(), -1)
    ref = log_probs(model)
    rtn = registry.get("compressor", "rtn")
    cost = torch.zeros(len(layers), len(options), dtype=torch.float64)
    size = torch.zeros_like(cost)
    for i, name in enumerate(layers):
        mod = model.get_submodule(name)
        keep = mod.weight.detach().clone()
        for j, b in enumerate(options):
            p = compress_layer(mod, rtn, None, QSpec(b, -1, act_order=False, mse=False))
            lq = log_probs(model)
            cost[i, j] = float((ref.exp() * (ref - lq)).sum(-1).mean())
            size[i, j] = p.storage_bits()
            mod.weight.copy_(keep)
    weights = torch.tensor([float(model.get_submodule(n).weight.numel()) for n in layers],
                           dtype=torch.float64)
    return CostTable(layers, [QSpec(b, -1) for b in options], cost, size, weights)


@torch.no_grad()
def layer_macs(model: nn.Module, layers: list[str], x: Tensor) -> dict[str, int]:
    """Multiply-accumulates of each layer for one input image (x [1, c, h, w]): output elements
    times the inputs each one reads (in_channels / groups x kernel area for a conv)."""
    macs, handles = {}, []
    for name in layers:
        def hook(mod, _args, out, name=name):
            per_out = mod.weight[0].numel()           # in/groups x kh x kw, or in_features
            macs[name] = macs.get(name, 0) + out[0].numel() * per_out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return macs


def bops_constraint(model: nn.Module, order: list[str], plan, table: CostTable, x: Tensor,
                    max_bops: float) -> dict:
    """ip's second constraint: bops [L, O] of the table's layers and what the budget leaves them
    once the fixed (edge) layers are paid; infeasible budgets are an error naming the range."""
    macs = layer_macs(model, order, x)
    act = {n: plan.acts[n] or 32 for n in order}
    fixed = sum(macs[n] * plan.weights[n].bits * act[n] for n in order if n not in table.layers)
    bops = torch.tensor([[macs[n] * o.bits * act[n] for o in table.options] for n in table.layers],
                        dtype=torch.float64)
    lo, hi = (fixed + float(bops.min(1).values.sum())) / 1e9, (fixed + float(bops.max(1).values.sum())) / 1e9
    if max_bops < lo - 1e-12:
        raise QuantkitError(f"--max-bops {max_bops:g} is infeasible: with these options and "
                            f"activation widths the model needs {lo:.4g} to {hi:.4g} GBOPs; raise "
                            "it or add smaller --bit-options")
    return {"bops": bops, "bops_budget": max_bops * 1e9 - fixed}


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def quantize_image_model(model: nn.Module, calib: Tensor | str, bits: float = 4,
                         act_bits: int | None = 8, method: str = "rtn", n_calib: int = 256,
                         edge_bits: int = 8, batch_size: int = 64, seed: int = 0,
                         calib_options: dict | None = None, method_options: dict | None = None,
                         alloc: str = "uniform", bit_options: list[int] = (2, 4, 8),
                         max_bops: float | None = None, bn_reestimate: bool = False,
                         bias_correction: bool = False, progress: bool = True) -> ImageReport:
    """Quantize `model` in place: weights at `bits` per output channel (first and last layer at
    edge_bits), each layer's input at act_bits (None: weight-only), by `method`: a compressor
    (rtn, gptq) or a reconstruction method (genie-m). alloc (pareto | ip | baq): mixed precision,
    `bits` is then the average over the middle layers, priced by ZeroQ's KL sensitivity on the
    calibration images; max_bops (GBOPs, with ip): the whole model's Σ MACs x weight bits x
    input bits (32 for a float input) stays within it too. bn_reestimate: afterwards, every
    BN-folded layer's output channels get back the fp model's mean and std on the calibration
    images (quant.convnet.reestimate_bn). bias_correction: before that, every layer's bias takes
    away the mean output shift its weight error causes on the calibration images
    (quant.convnet.bias_correct)."""
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    recon = method in registry.names("reconstruction")
    if max_bops is not None and alloc != "ip":
        raise QuantkitError(f"--max-bops needs --alloc ip (the only allocator with a second "
                            f"constraint); got --alloc {alloc}")
    if not recon and method not in ("rtn", "gptq"):
        raise QuantkitError(f"image models: --method {method!r} is not available; use rtn | gptq | "
                            + " | ".join(registry.names("reconstruction")))
    model.eval()
    original = sum(p.numel() * 4 for p in model.parameters())
    x = calibration_images(model, calib, n_calib, seed, calib_options, progress)
    calib_seconds = time.time() - t0
    tr = trace(model, x[:2])
    if not tr.order:
        raise QuantkitError(f"{type(model).__name__}: no Conv2d or Linear layer ran in the forward")
    folded = set(fold_batchnorm(model, tr))
    reference = copy.deepcopy(model) if bn_reestimate or bias_correction else None
    plan = default_plan(tr.order, int(bits) if alloc == "uniform" else edge_bits, act_bits, edge_bits,
                        first_output=tr.readers(tr.order[1]) if len(tr.order) > 1 else None)
    plan.units = units(model, tr.order)
    choice, gbops = {}, None
    if alloc != "uniform":
        table = kl_table(model, tr.order[1:-1], list(bit_options), x, batch_size)
        table.check_feasible(bits)
        extra = {} if max_bops is None else bops_constraint(model, tr.order, plan, table, x[:1], max_bops)
        picked = registry.get("allocator", alloc)(table, bits, **extra)
        if extra:                  # what the choice spends: the fixed layers plus the chosen ones
            gbops = (max_bops * 1e9 - extra["bops_budget"]
                     + float(extra["bops"].gather(1, picked[:, None]).sum())) / 1e9
        choice = {n: int(table.options[int(o)].bits) for n, o in zip(table.layers, picked)}
        plan.weights.update({n: replace(plan.weights[n], bits=b) for n, b in choice.items()})
    elif bits != int(bits):
        raise QuantkitError(f"--bits {bits}: a fractional budget needs --alloc pareto | ip | baq")
    batches = list(x.split(batch_size))
    method_info = {}
    if recon:
        hooks = registry.hooks("reconstruction", method)
        cfg = build_config(hooks.config, method_options or {}, method)
        # a reconstruction may add a third item: what it decided per unit, for the run record
        packed, quantizers, *info = registry.get("reconstruction", method)(model, plan, batches, cfg,
                                                                           seed=seed, progress=progress)
        method_info = info[0] if info else {}
    else:
        packed, quantizers = quantize_convnet(model, plan, registry.get("compressor", method),
                                              batches, progress)
    biases = {}
    if bias_correction:
        biases = bias_correct(model, reference, [n for n in tr.order if n in packed], batches, progress)
    if bn_reestimate:
        layers = [n for n in tr.order if tr.bn_of.get(n) in folded and n in packed]
        biases.update(reestimate_bn(model, reference, layers, packed, batches, progress))
    n_weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    bpw = sum(p.storage_bits() for p in packed.values()) / n_weights
    return ImageReport(method=method, calib=calib if isinstance(calib, str) else "images",
                       bits=bits, act_bits=act_bits, seconds=time.time() - t0,
                       calib_seconds=calib_seconds, bits_per_weight=bpw, n_layers=len(packed),
                       settings={"n_calib": len(x), "edge_bits": edge_bits, "seed": seed,
                                 "alloc": alloc, "layer_bits": choice, "max_bops": max_bops,
                                 "gbops": gbops, "bn_reestimate": bn_reestimate,
                                 "bias_correction": bias_correction,
                                 "calib_options": calib_options or {},
                                 "method_options": method_options or {},
                                 "method_info": method_info},
                       original_size_bytes=original, model=model, packed=packed, quantizers=quantizers,
                       biases=biases)

