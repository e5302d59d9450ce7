"""Image classifiers with BatchNorm, read from the module tree: their quantizable layers (Conv2d,
grouped and depthwise too, and Linear), the BatchNorm each conv feeds (found by tracing one
forward, not by names), BN folding, and the reconstruction units (residual / inverted-residual
blocks) that learned rounding optimises one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantkit.errors import QuantkitError

UNIT_MAX_LAYERS = 4     # a unit is the largest subtree with at most this many quantizable layers


def is_quant_layer(m: nn.Module) -> bool:
    """A layer whose weight quantkit quantizes in an image model: Conv2d or Linear."""
    return isinstance(m, (nn.Conv2d, nn.Linear))


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers by qualified name, in registration order."""
    return {n: m for n, m in model.named_modules() if n and is_quant_layer(m)}


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def input_shape(model: nn.Module, size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) the model takes: the first conv's channels; the size from the
    model's config when it has one (image_size), else `size`, else 224."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise QuantkitError(f"{type(model).__name__}: no Conv2d layer found; image quantization "
                            "expects a convolutional classifier")
    size = size or getattr(getattr(model, "config", None), "image_size", None) or 224
    size = size if isinstance(size, int) else size[0]
    return first.in_channels, size, size


@dataclass
class Trace:
    order: list[str]            # quantizable layers in execution order
    bn_of: dict[str, str]       # conv -> the BatchNorm that reads its output directly
    calls: dict[str, int]       # module name -> times called in one forward
    reads: dict[str, int] = field(default_factory=dict)   # layer -> which tensor it read (same id: same tensor)

    def readers(self, name: str) -> list[str]:
        """The layers that read the very tensor `name` reads (name included), in order."""
        return [n for n in self.order if self.reads.get(n, n) == self.reads.get(name, name)]


@torch.no_grad()
def trace(model: nn.Module, x: Tensor) -> Trace:
    """Run one forward on x and record the execution order and conv -> BN edges."""
    names = {id(m): n for n, m in model.named_modules()}
    outputs: dict[int, tuple[str, Tensor]] = {}     # tensors kept alive so ids stay unique
    order, bn_of, calls, handles, reads, alive = [], {}, {}, [], {}, []

    def after(mod, args, out):
        name = names[id(mod)]
        calls[name] = calls.get(name, 0) + 1
        if is_quant_layer(mod):
            order.append(name)
            outputs[id(out)] = (name, out)
            if args:
                reads.setdefault(name, id(args[0]))
                alive.append(args[0])

    def before_bn(mod, args):
        hit = outputs.get(id(args[0]))
        if hit is not None and isinstance(model.get_submodule(hit[0]), nn.Conv2d):
            bn_of.setdefault(hit[0], names[id(mod)])

    for m in model.modules():
        handles.append(m.register_forward_hook(after))
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(before_bn))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return Trace(list(dict.fromkeys(order)), bn_of, calls, reads)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


@torch.no_grad()
def fold_batchnorm(model: nn.Module, tr: Trace) -> list[str]:
    """Fold every BatchNorm that directly follows a conv into that conv (weight and bias) and
    replace it by Identity; returns the folded BN names. BNs used by anything else stay."""
    folded = []
    for conv_name, bn_name in tr.bn_of.items():
        if tr.calls.get(bn_name, 1) != 1 or tr.calls.get(conv_name, 1) != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        inv = (bn.running_var + bn.eps).rsqrt()
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        k = gamma * inv
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * k + beta)
        parent, leaf = _parent(model, bn_name)
        setattr(parent, leaf, nn.Identity())
        folded.append(bn_name)
    return folded


def units(model: nn.Module, layers: list[str], max_layers: int = UNIT_MAX_LAYERS) -> list[str]:
    """Reconstruction units in the order of `layers` (execution order). A layer's unit is its
    lowest ancestor that is an element of a ModuleList / Sequential and holds 2..max_layers
    quantizable layers (a residual or inverted-residual block); failing that, its highest
    ancestor holding at most max_layers (a lone stem conv or head is its own unit)."""
    count: dict[str, int] = {}
    for name in layers:
        parts = name.split(".")
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            count[key] = count.get(key, 0) + 1

    def in_container(prefix: str) -> bool:
        parent = prefix.rpartition(".")[0]
        return bool(prefix) and isinstance(model.get_submodule(parent) if parent else model,
                                           (nn.ModuleList, nn.Sequential))
    out: list[str] = []
    for name in layers:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts) + 1)]
        block = [p for p in prefixes if 2 <= count[p] <= max_layers and in_container(p)]
        unit = block[-1] if block else next(p for p in prefixes if count[p] <= max_layers)
        if not out or out[-1] != unit:
            if unit in out:
                raise QuantkitError(f"reconstruction unit {unit!r} is entered twice in one forward;"
                                    " its layers do not run contiguously")
            out.append(unit)
    return out


def unit_layers(unit: str, layers: list[str]) -> list[str]:
    """The layers (of `layers`) that belong to `unit`."""
    return [n for n in layers if unit == "" or n == unit or n.startswith(unit + ".")]


def weight_2d(m: nn.Module) -> Tensor:
    """A conv's weight as [out, in/groups·kh·kw] (a Linear's as it is)."""
    return m.weight.reshape(m.weight.shape[0], -1)


def groups(m: nn.Module) -> int:
    return m.groups if isinstance(m, nn.Conv2d) else 1


def unfold_input(m: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of its weight's columns: [groups, positions, in/groups·kh·kw].

    A conv's own children run first (e.g. EfficientNet's static same-padding module), since
    they are part of what the weights see."""
    if isinstance(m, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    for name, child in m.named_children():
        if name != "input_quantizer":          # already applied: x is what the layer got
            x = child(x)
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)   # [B, C·kh·kw, L]
    g = m.groups
    k = cols.shape[1] // g
    return cols.reshape(cols.shape[0], g, k, -1).permute(1, 0, 3, 2).reshape(g, -1, k)
