"""Weight and activation quantization of image classifiers, unit by unit.

Weights: per output channel, asymmetric, by any integer compressor (RTN, GPTQ) on the conv
weight as [out, in/groups·kh·kw]; a grouped or depthwise conv is compressed group by group, each
with the Hessian of its own unfolded inputs (stats/ accumulator), and stored as one matrix.
Activations: each layer's input through an ActQuantizer (quant/act.py). Units run in execution
order, each on the inputs the already-quantized units before it produce (GPTQ's sequential
order).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, int_parts, make_int
from quantkit.model.convnet import groups, unfold_input, unit_layers, weight_2d
from quantkit.quant.act import ActQuantizer, attach_input_quantizers
from quantkit.stats.hessian import GroupedHessian
from quantkit.types import LayerStats, QSpec


class _Stop(Exception):
    pass


@dataclass
class ConvPlan:
    """What each layer gets: weight QSpec and input activation bits (None: fp input)."""
    weights: dict[str, QSpec]
    acts: dict[str, int | None]
    order: list[str]                       # the layers in execution order
    units: list[str] = field(default_factory=list)


def default_plan(order: list[str], bits: int, act_bits: int | None, edge_bits: int = 8,
                 method_spec: QSpec | None = None, first_output: list[str] | None = None) -> ConvPlan:
    """Per output channel asymmetric weights; the first and last layers at edge_bits: their
    weights, the last one's input and the first one's output, i.e. the input of every layer in
    first_output (default: the second layer; Trace.readers(order[1]) names all that read the
    same tensor). The first layer's input is the image itself and stays fp. (BRECQ / QDrop /
    Genie's setting.)"""
    base = method_spec or QSpec(bits=bits, group_size=-1, sym=False, act_order=True, mse=False)
    eight = set(order[1:2] if first_output is None else first_output) | set(order[-1:])
    weights, acts = {}, {}
    for i, name in enumerate(order):
        edge = i in (0, len(order) - 1)
        weights[name] = QSpec(**{**base.__dict__, "bits": edge_bits if edge else bits})
        acts[name] = None if i == 0 or act_bits is None else (edge_bits if name in eight else act_bits)
    return ConvPlan(weights, acts, order)


def run_batches(model: nn.Module, batches: list[Tensor], stop_after: nn.Module | None = None,
                pre_hooks: dict | None = None, hooks: dict | None = None) -> None:
    """Forward every batch with forward pre-hooks / hooks ({module: fn}) in place; with
    stop_after, each forward ends once that module has run."""
    handles = [m.register_forward_pre_hook(f) for m, f in (pre_hooks or {}).items()]
    handles += [m.register_forward_hook(f) for m, f in (hooks or {}).items()]
    if stop_after is not None:
        def stop(*_):
            raise _Stop
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def layer_hessians(model: nn.Module, names: list[str], batches: list[Tensor],
                   stop_after: nn.Module | None = None) -> dict[str, list[LayerStats]]:
    """Per layer, one LayerStats per conv group, from the inputs the layer actually receives
    (after its input quantizer)."""
    accs: dict[str, GroupedHessian] = {}
    hooks = {}
    for name in names:
        mod = model.get_submodule(name)
        accs[name] = GroupedHessian(groups(mod), weight_2d(mod).shape[1])

        def hook(m, args, name=name):          # runs after the input quantizer's own pre-hook
            accs[name].add(unfold_input(m, args[0].float()))
        hooks[mod] = hook
    run_batches(model, batches, stop_after, pre_hooks=hooks)
    return {n: acc.finalize() for n, acc in accs.items()}


def compress_layer(mod: nn.Module, compressor, stats: list[LayerStats] | None,
                   spec: QSpec, write: bool = True) -> PackedLinear:
    """Compress one conv/linear (group by group for grouped convs) and, with `write`, write the
    dequantized weight back; returns the packed weight [out, in/groups·kh·kw]."""
    W = weight_2d(mod).detach().float()
    g = groups(mod)
    if spec.group_size != -1:
        raise QuantkitError("image models quantize weights per output channel: group_size -1")
    rows = W.shape[0] // g
    parts = [compressor(W[i * rows:(i + 1) * rows], None if stats is None else stats[i], spec)
             for i in range(g)]
    if g == 1:
        packed = parts[0]
    else:
        if any(p.format != "int" for p in parts):
            raise QuantkitError(f"{type(mod).__name__} with groups={g}: only integer formats "
                                "(rtn, gptq) can store a grouped conv")
        codes, scales, zeros, _ = (torch.cat(t) for t in zip(*(int_parts(p) for p in parts)))
        packed = make_int(codes, scales, None if spec.sym else zeros, spec.bits, -1)
    if write:
        with torch.no_grad():
            mod.weight.copy_(packed.dequantize().reshape(mod.weight.shape).to(mod.weight))
    return packed


def calibrate_activations(model: nn.Module, quantizers: dict[str, ActQuantizer],
                          batches: list[Tensor], stop_after: nn.Module | None = None,
                          sample: int = 1 << 16) -> None:
    """Set each quantizer's signedness and MSE range from the values it receives (a fixed
    random subsample per batch, plus each batch's extremes so the range is seen whole)."""
    seen: dict[str, list[Tensor]] = {n: [] for n in quantizers}
    gen = torch.Generator().manual_seed(0)
    names = {q: n for n, q in quantizers.items()}

    def grab(q, args):
        x = args[0].detach().flatten().float()
        idx = torch.randint(0, x.numel(), (min(sample, x.numel()),), generator=gen)
        seen[names[q]].append(torch.cat([x[idx], x.min()[None], x.max()[None]]))
    run_batches(model, batches, stop_after, pre_hooks={q: grab for q in quantizers.values()})
    for name, q in quantizers.items():
        q.calibrate(torch.cat(seen[name]))


def quantize_convnet(model: nn.Module, plan: ConvPlan, compressor, batches: list[Tensor] | None,
                     progress: bool = True) -> tuple[dict[str, PackedLinear], dict[str, ActQuantizer]]:
    """Quantize unit by unit in execution order: calibrate the unit's activation quantizers,
    then compress its weights (GPTQ on Hessians of the inputs the layer gets, quantized
    units before it included). Returns (packed weights, activation quantizers)."""
    acts = {n: b for n, b in plan.acts.items() if b is not None}
    if (acts or getattr(compressor, "needs_stats", True)) and not batches:
        raise QuantkitError("activation quantization and data-driven compressors need "
                            "calibration images: real ones, or --calib zeroq | genie")
    quantizers = attach_input_quantizers(model, acts)
    packed = {}
    for unit in tqdm(plan.units or [""], desc="units", disable=not progress):
        stop = model.get_submodule(unit) if unit else None
        names = [n for n in unit_layers(unit, plan.order) if n in plan.weights]
        mine = {n: quantizers[n] for n in names if n in quantizers}
        if mine:
            calibrate_activations(model, mine, batches, stop)
        stats = (layer_hessians(model, names, batches, stop)
                 if getattr(compressor, "needs_stats", True) else {})
        for n in names:
            packed[n] = compress_layer(model.get_submodule(n), compressor, stats.get(n),
                                       plan.weights[n])
    return packed, quantizers


def _by_channel(y: Tensor) -> Tensor:
    """A layer's output [N, C, ...] as float64 [C, everything else]: one row per channel."""
    return y.double().transpose(0, 1).reshape(y.shape[1], -1)


@torch.no_grad()
def channel_stats(model: nn.Module, layers: list[str], batches: list[Tensor],
                  stop_after: nn.Module | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per named layer, (mean, std) of each output channel over the images and positions
    (dim 1 of the output), in float64."""
    sums: dict[str, list] = {n: [0, 0, 0] for n in layers}

    def hook(name):
        def f(_m, _args, out):
            y = _by_channel(out.detach())
            acc = sums[name]
            acc[0], acc[1], acc[2] = acc[0] + y.sum(1), acc[1] + (y * y).sum(1), acc[2] + y.shape[1]
        return f
    run_batches(model, batches, stop_after, hooks={model.get_submodule(n): hook(n) for n in layers})
    out = {}
    for n, (s, s2, k) in sums.items():
        mean = s / k
        out[n] = mean, (s2 / k - mean * mean).clamp(min=0).sqrt()
    return out


def _set_bias(mod: nn.Module, value: Tensor) -> Tensor:
    """Give the layer this bias (creating it when the layer had none); returns a copy."""
    value = value.to(mod.weight.dtype)
    if mod.bias is None:
        mod.bias = nn.Parameter(value, requires_grad=False)
    else:
        mod.bias.copy_(value)
    return value.clone()


@torch.no_grad()
def reestimate_bn(model: nn.Module, reference: nn.Module, layers: list[str],
                  packed: dict[str, PackedLinear], batches: list[Tensor],
                  progress: bool = True) -> dict[str, Tensor]:
    """BatchNorm re-estimation, in folded form: each named (BN-folded) layer's output channels
    get, in the quantized model, the mean and std that the same channels have in `reference`
    (the unquantized folded model) on the same images: y' = s (y - μ_q) + μ_ref with
    s = σ_ref / σ_q. s multiplies the layer's packed per-channel scales (codes unchanged, so
    the weights stay on their grid) and the bias takes the shift. Layers in execution order,
    each measured with the corrections before it in place. Returns the new biases."""
    target = channel_stats(reference, layers, batches)
    biases = {}
    for name in tqdm(layers, desc="bn re-estimation", disable=not progress):
        mod = model.get_submodule(name)
        mean, std = channel_stats(model, [name], batches, stop_after=mod)[name]
        ref_mean, ref_std = target[name]
        s = torch.where(std > 1e-8, ref_std / std.clamp(min=1e-8), torch.ones_like(std))
        p = packed[name]
        old = p.tensors["scales"].float()
        p.tensors["scales"] = (old * s[:, None].float()).to(torch.float16)
        s = (p.tensors["scales"].float() / old.masked_fill(old == 0, 1))[:, 0].double()   # as stored
        mod.weight.copy_(p.dequantize().reshape(mod.weight.shape).to(mod.weight))
        bias = mod.bias.double() if mod.bias is not None else torch.zeros_like(mean)
        biases[name] = _set_bias(mod, s * (bias - mean) + ref_mean)
    return biases


@torch.no_grad()
def bias_correct(model: nn.Module, reference: nn.Module, layers: list[str],
                 batches: list[Tensor], progress: bool = True) -> dict[str, Tensor]:
    """Bias correction (Nagel et al. 2019, empirically): each named layer's weight error
    δW = W_q - W_ref shifts its output channels by E[δW * x] on average; subtract it from the
    bias. The expectation is taken exactly on the calibration images: the reference (unquantized,
    BN-folded) model's own input to the layer goes through a copy of the layer holding δW and
    no bias (so its padding, stride and groups apply), averaged over images and positions.
    Returns the new biases (also written into `model`)."""
    deltas, sums = {}, {}
    for name in layers:
        mod, ref = model.get_submodule(name), reference.get_submodule(name)
        d = copy.deepcopy(ref)
        d.weight.copy_(mod.weight - ref.weight)
        if d.bias is not None:
            d.bias.zero_()
        deltas[ref] = name, d

    def hook(ref, args):
        name, d = deltas[ref]
        y = _by_channel(d(args[0]))
        s, k = sums.get(name, (0, 0))
        sums[name] = s + y.sum(1), k + y.shape[1]
    run_batches(reference, tqdm(batches, desc="bias correction", disable=not progress),
                pre_hooks={ref: hook for ref in deltas})
    biases = {}
    for name in layers:
        mod = model.get_submodule(name)
        s, k = sums[name]
        bias = mod.bias.double() if mod.bias is not None else torch.zeros_like(s)
        biases[name] = _set_bias(mod, bias - s / k)
    return biases
