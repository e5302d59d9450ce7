"""Loading checkpoints: originals to quantize (local dir, hub id or asset name) and packed ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.io import read_config_json, weight_files
from quantkit.model import zoo
from quantkit.model.discovery import find_blocks, linears, weight_matrix
from quantkit.model.stream import ATTR, Streamed, bound_heap, canonical, non_finite


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
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise QuantkitError(f"config.json: architectures must be a list of class names, got {archs!r}")
    for arch in archs:
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
    if Path(source).is_dir():
        read_config_json(source)                 # not JSON: say so, not a hub error
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    except Exception as e:                       # transformers' own validation of the fields
        raise QuantkitError(f"{source}/config.json: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}; fix the field or restore the file") from e


def check_weight_files(source: str, config) -> None:
    """Before loading a local checkpoint, from the safetensors headers alone (no tensor read):
    every shard the index names is present, every file's header is whole and covers its data,
    and every tensor has the shape the architecture built from config.json expects."""
    import safetensors
    d = Path(source)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QuantkitError(f"{index}: corrupt shard index ({e}); restore it from the original "
                                "checkpoint") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise QuantkitError(f"{source}: shard {missing[0]} is missing ({len(missing)} of "
                                f"{len(files)} named by {index.name}); download it again")
    else:
        files = sorted(f.name for f in d.glob("*.safetensors"))
        if not files and not any(d.glob("*.bin")):
            raise QuantkitError(f"{source}: no weights (model.safetensors, sharded safetensors with "
                                "an index, or pytorch_model.bin) beside config.json; download them")
    model = _meta_model(config)
    params = dict(model.named_parameters())                    # tied copies counted once
    expected = {n: (tuple(t.shape), t.is_floating_point()) for n, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    containers = {".".join(n.split(".")[:2]) for n in params}
    seen: set[str] = set()
    for f in files:
        path = d / f
        try:
            with safetensors.safe_open(str(path), "pt") as st:
                header = {k: (tuple(sl.get_shape()), sl.get_dtype())
                          for k in st.keys() for sl in [st.get_slice(k)]}
        except Exception as e:                                   # SafetensorError and kin
            raise QuantkitError(f"{path}: corrupt or truncated safetensors file ({e}); download "
                                "it again") from e
        for key, (shape, dtype) in header.items():
            name = canonical(key, expected, prefix)
            if name is None:
                if key.endswith((".weight", ".bias")) and ".".join(key.split(".")[:2]) in containers:
                    raise QuantkitError(f"{path}: tensor {key} has no place in the model config.json "
                                        "describes (a layer count or name that does not match the "
                                        "weights); fix config.json or download the checkpoint again")
                continue
            seen.add(name)
            want, floating = expected[name]
            if want != shape:
                raise QuantkitError(f"{path}: tensor {key} has shape {list(shape)} but config.json "
                                    f"implies {list(want)}; the weights and config.json do not match")
            if floating and not dtype.startswith(("F", "BF")):
                raise QuantkitError(f"{path}: tensor {key} is stored as {dtype}, not a floating-point "
                                    "type; the file is corrupt: download it again")
    missing = [n for n in params if n not in seen]
    if files and missing:
        raise QuantkitError(f"{source}: {len(missing)} weights that config.json implies are in no "
                            f"weight file (first: {missing[0]}); download the checkpoint again or "
                            "fix config.json")


def _meta_model(config) -> nn.Module:
    """The architecture entirely on the meta device (nothing allocated, whatever the sizes)."""
    cls = model_class(config)
    try:
        with torch.device("meta"):
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception as e:
        raise QuantkitError(f"config.json: no {cls.__name__} can be built from it ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); fix the field or restore the file") from e


def check_finite(model: nn.Module) -> None:
    """Every parameter finite, or an error naming the first bad tensor."""
    non_finite(model.named_parameters())


def _original(name: str):
    """(source, config) of an original checkpoint to quantize, its weight files checked."""
    source = resolve_source(name)
    config = load_config(source)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == "quantkit":
        raise QuantkitError(f"{name} is already quantized by quantkit; load it with quantkit.load()")
    if Path(source).is_dir():
        check_weight_files(source, config)
    return source, config


def _tokenizer(source: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e


def load_model(name: str, device: str = "cpu", dtype=torch.float32):
    """(model in eval mode, tokenizer, source) for an original checkpoint to quantize."""
    source, config = _original(name)
    try:
        model = model_class(config).from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    tokenizer = _tokenizer(source)
    find_blocks(model)  # fail early on unsupported architectures
    check_finite(model)
    return model.to(device).eval(), tokenizer, source


def stream_model(name: str, dtype=torch.float32):
    """(skeleton model whose weights stay in the checkpoint's files until a block needs them
    (model.stream), tokenizer, source): nothing but the buffers is allocated here."""
    source, config = _original(name)
    if not Path(source).is_dir() or not weight_files(source)[0].is_file():
        raise QuantkitError(f"{name}: streaming reads a local checkpoint with safetensors weights; "
                            "download it (or convert pytorch_model.bin to safetensors) first")
    model = build_empty(config).eval()
    find_blocks(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()                     # a tied head is read once, from the embedding
    model.config.dtype = dtype                  # as from_pretrained(dtype=) records it
    if (Path(source) / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(source)
    setattr(model, ATTR, Streamed(model, source, dtype))
    bound_heap()
    return model, _tokenizer(source), source


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
