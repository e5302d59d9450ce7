"""Loading checkpoints: originals to quantize (local dir, hub id or asset name) and packed ones."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model import zoo
from quantkit.model.discovery import find_blocks, linears, weight_matrix


def resolve_source(name: str) -> str:
    """A local checkpoint directory or a hub id; asset names are converted once and cached."""
    if name in zoo.ASSETS:
        return str(zoo.resolve(name))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise QuantkitError(f"{name}: directory has no config.json; point at a Hugging Face "
                                "checkpoint directory")
        return str(p)
    if p.exists():
        raise QuantkitError(f"{name}: is a file; point at a checkpoint directory (with config.json)")
    looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise QuantkitError(f"{name}: no such directory, and not a hub id (org/name) or a known model "
                            f"({', '.join(zoo.ASSETS)})")
    return name


def model_class(config):
    """The transformers class to build: the checkpoint's own architecture when known."""
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel if not getattr(config, "is_decoder", True) else \
        transformers.AutoModelForCausalLM


def _hub_error(name: str, e: Exception) -> QuantkitError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "HF_HUB_OFFLINE=1 is set" if offline else "the hub may be unreachable"
    return QuantkitError(f"cannot load {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                         f"({hint}; pass a local checkpoint directory instead)")


def load_config(source: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e


def load_model(name: str, device: str = "cpu", dtype=torch.float32):
    """(model in eval mode, tokenizer, source) for an original checkpoint to quantize."""
    from transformers import AutoTokenizer
    source = resolve_source(name)
    config = load_config(source)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "quantkit":
        raise QuantkitError(f"{name} is already quantized by quantkit; load it with quantkit.load()")
    try:
        model = model_class(config).from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    find_blocks(model)  # fail early on unsupported architectures
    return model.to(device).eval(), tokenizer, source


def build_empty(config) -> nn.Module:
    """The architecture with parameters on the meta device (buffers real: rotary tables etc.)."""
    from accelerate import init_empty_weights
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def layer_shapes(model: str | nn.Module) -> dict[str, tuple[int, int]]:
    """[out, in] of every block linear of a model, or of a source checkpoint from its config
    alone (built on the meta device: no weight is read)."""
    if not isinstance(model, nn.Module):
        model = build_empty(load_config(resolve_source(model)))
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": tuple(weight_matrix(m).shape)
            for i, b in enumerate(blocks) for n, m in linears(b).items()}
