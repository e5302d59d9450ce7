"""quantkit.load: a packed checkpoint back as a transformers model with QuantLinear layers."""
from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.formats.io import load_tensors, packed_from_tensors, read_manifest
from quantkit.model.discovery import Conv1D
from quantkit.model.loader import build_empty
from quantkit.model.stream import trim_heap
from quantkit.nn.qlinear import QuantLinear, replace_linear


def install_quant_linears(model: nn.Module, manifest: dict, tensors: dict[str, Tensor],
                          kernel: str = "auto") -> None:
    """Swap each manifest layer for a QuantLinear holding its tensors (popped from `tensors`).

    The tensors may be on the meta device (from_pretrained fills them in afterwards).
    """
    for name, p in packed_from_tensors(tensors, manifest).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QuantkitError(f"checkpoint layer {name} does not exist in {type(model).__name__}") from None
        if not (isinstance(old, nn.Linear) or (Conv1D and isinstance(old, Conv1D))):
            raise QuantkitError(f"checkpoint layer {name} is a {type(old).__name__} in this architecture")
        replace_linear(model, name, QuantLinear(p, tensors.pop(f"{name}.bias", None), kernel))


def load(path: str | Path, device: str = "cpu", kernel: str = "auto", dtype=None,
         keep_packed: bool = False) -> nn.Module:
    """Load a quantkit checkpoint for serving; `kernel` forces one kernel ('reference' is the oracle).

    `dtype` (e.g. torch.bfloat16) casts the unquantized weights, hence the activations;
    packed tensors and biases of quantized layers keep their stored dtypes. Kernels are prepared
    here; unless `keep_packed`, a layer whose kernel holds its own copy drops the packed tensors
    (half the memory; such a model runs but cannot be moved, dequantized or saved).
    """
    from transformers import AutoConfig
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"{path}: no such checkpoint directory")
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = build_empty(config)
    tensors = load_tensors(path)
    install_quant_linears(model, manifest, tensors, kernel)
    # as from_pretrained(dtype=): checkpoint weights cast, buffers kept; copied out of the file's
    # memory map so that it closes once the packed tensors are released
    tensors = {k: t.to(dtype or t.dtype, copy=True) if t.is_floating_point() else t.clone()
               for k, t in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantkitError(f"{path}: unexpected tensors in checkpoint: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if still_meta:
        raise QuantkitError(f"{path}: checkpoint lacks tensors: {still_meta[:5]}")
    model.config.quantization_config = manifest
    model.to(device).eval()
    gc.collect()
    for m in model.modules():      # kernels' layouts now, not in the first request
        if isinstance(m, QuantLinear):
            m.prepare(torch.device(device).type, release=not keep_packed)
            trim_heap(collect=False)   # each layer's unpacking scratch, before the next one's
    return model
