"""quantkit.load: a packed checkpoint back as a transformers model with QuantLinear layers."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.io import load_tensors, packed_from_tensors, read_manifest
from quantkit.model.discovery import Conv1D
from quantkit.model.loader import build_empty
from quantkit.nn.qlinear import QuantLinear, replace_linear


def load(path: str | Path, device: str = "cpu", kernel: str = "auto") -> nn.Module:
    """Load a quantkit checkpoint; `kernel` forces one kernel ('reference' is the oracle)."""
    from transformers import AutoConfig
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"{path}: no such checkpoint directory")
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = build_empty(config)
    tensors = load_tensors(path)
    packed = packed_from_tensors(tensors, manifest)
    for name, p in packed.items():
        old = model.get_submodule(name)
        if not (isinstance(old, nn.Linear) or (Conv1D and isinstance(old, Conv1D))):
            raise QuantkitError(f"checkpoint layer {name} is a {type(old).__name__} in this architecture")
        bias = tensors.pop(f"{name}.bias", None)
        replace_linear(model, name, QuantLinear(p, bias, kernel))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantkitError(f"{path}: unexpected tensors in checkpoint: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if still_meta:
        raise QuantkitError(f"{path}: checkpoint lacks tensors: {still_meta[:5]}")
    model.config.quantization_config = manifest
    return model.to(device).eval()
