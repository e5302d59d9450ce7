"""Packed checkpoints: safetensors + a manifest in config.json, written atomically."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import safetensors
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.formats.sparse import wrapper_overhead

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"       # a sharded (streamed) output's weights
QUANT_METHOD = "quantkit"
FORMAT_VERSION = 1
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


OUTPUT_MARKERS = ("run.json", "quantkit_image.json")   # files only a quantkit output holds


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """Fail before any work when `out` cannot be written: it exists and `overwrite` is off;
    it exists and is neither empty nor an earlier quantkit output (never replaced, whatever the
    flag); or the nearest existing parent is not a writable directory."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise QuantkitError(f"{out} already exists: pass --overwrite (overwrite=True) to replace "
                                "it, or choose another --out")
        if not out.is_dir() or (any(out.iterdir()) and
                                not any((out / m).is_file() for m in OUTPUT_MARKERS)):
            raise QuantkitError(f"{out} is not an earlier quantkit output (no {' or '.join(OUTPUT_MARKERS)})"
                                ": refusing to replace it even with --overwrite; choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QuantkitError(f"{out}: {parent} is not a writable directory; choose another --out")
    return out


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory that becomes `out` only when the block succeeds (its
    files and itself fsynced, then renamed), so `out` is whole or absent: a failed or killed
    run leaves at most a `.NAME.tmp-*` sibling. `out` itself is checked by check_output."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"                              # then the writer's pid
    for stale in out.parent.glob(prefix + "*"):               # left by a killed run
        if not _alive(stale.name[len(prefix):].split("-")[0]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
    try:
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _fsync(tmp)
        except OSError as e:
            free = shutil.disk_usage(out.parent).free / 2**30
            what = "disk full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
            raise QuantkitError(f"writing {out}: {what} ({free:.1f} GiB free on its disk); nothing "
                                "was written there: free space or choose another --out") from e
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantization_config(packed: dict[str, PackedLinear], extra: dict | None = None) -> dict:
    """The manifest: per-layer format, shape and metadata."""
    layers = {n: {"format": p.format, "shape": list(p.shape), **p.meta} for n, p in packed.items()}
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "layers": layers, **(extra or {})}


def state_dict_for_save(model: nn.Module, packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """Dense tensors of unquantized modules plus the packed tensors; tied copies dropped."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if mod in packed and leaf == "weight":
            continue
        if t.data_ptr() in seen and t.numel():  # tied weights are re-tied on load
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    for name, p in packed.items():
        for k, t in p.tensors.items():
            out[f"{name}.{k}"] = t.contiguous().cpu()
    return out


def save_packed(dir: Path, model: nn.Module, packed: dict[str, PackedLinear], extra: dict) -> None:
    """Write config.json (with the manifest) and model.safetensors into dir."""
    save_file(state_dict_for_save(model, packed), str(dir / WEIGHTS), metadata={"format": "pt"})
    _write_config(dir, model, packed, extra)


def _write_config(dir: Path, model: nn.Module, packed: dict[str, PackedLinear], extra: dict) -> None:
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(packed, extra)
    (dir / "config.json").write_text(json.dumps(config, indent=2, default=str))


def shard_name(i: int, n: int) -> str:
    """The i-th (from 0) of n weight shards, named as transformers names them."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(directory: Path, i: int, n: int, tensors: dict[str, torch.Tensor]) -> Path:
    """One shard of a streamed output, whole or absent (written aside, fsynced, renamed)."""
    path = Path(directory) / shard_name(i, n)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
    _fsync(tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(out: str | Path, model: nn.Module, packed: dict[str, PackedLinear], tokenizer,
                    extra: dict, files: Callable[[int], dict[str, str]], overwrite: bool = False,
                    shards: tuple[Path, int] | None = None) -> int:
    """Write the whole output directory atomically: weights + manifest, tokenizer (when there is
    one), generation config and the text files `files(weights' size in bytes)` names; returns
    the weights' size. shards: (directory, n) where a streamed run already wrote its n weight
    shards; they are linked in (with an index) instead of writing the model's tensors."""
    with atomic_dir(out, overwrite) as tmp:
        if shards is None:
            save_packed(tmp, model, packed, extra)
            size = (tmp / WEIGHTS).stat().st_size
        else:
            size = _link_shards(shards[0], shards[1], tmp)
            _write_config(tmp, model, packed, extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for name, text in files(size).items():
            (tmp / name).write_text(text)
        return size


def _link_shards(src: Path, n: int, dst: Path) -> int:
    """The n shards of `src` into `dst` (hard links, copies across file systems) with their
    index; `src` keeps its own until the output is whole, so a run killed here still resumes."""
    weight_map, size = {}, 0
    for i in range(n):
        name = shard_name(i, n)
        try:
            os.link(Path(src) / name, dst / name)
        except OSError:
            shutil.copy2(Path(src) / name, dst / name)
        with safetensors.safe_open(str(dst / name), "pt") as f:
            for k in f.keys():
                weight_map[k] = name
                sl = f.get_slice(k)
                size += math.prod(sl.get_shape()) * SAFETENSORS_DTYPES[sl.get_dtype()].itemsize
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return sum((dst / shard_name(i, n)).stat().st_size for i in range(n))


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, else its
    *.safetensors files (model.safetensors, reported missing by the reader, when none)."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise QuantkitError(f"{index}: corrupt shard index ({e}); re-run the quantization") from e
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors")) or [path / WEIGHTS]


def read_config_json(directory: str | Path) -> dict:
    """A checkpoint directory's config.json as a dict, or a clear error when it is not JSON."""
    path = Path(directory).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path}: corrupt config.json ({e}); restore it from the original "
                            "checkpoint") from e
    if not isinstance(config, dict):
        raise QuantkitError(f"{path}: config.json holds a {type(config).__name__}, not an object")
    return config


def read_manifest(path: str | Path) -> dict:
    """The quantization_config of a quantkit checkpoint, or a clear error."""
    if not (Path(path) / "config.json").is_file():
        raise QuantkitError(f"{path}: no config.json; not a checkpoint directory")
    config = read_config_json(path)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise QuantkitError(f"{path}: not a quantkit checkpoint (quant_method="
                            f"{qc.get('quant_method')!r}); quantize it first with `quantkit quantize`")
    return qc


def is_quantkit_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory holding a quantkit output (its config's quant_method)."""
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def inspect_checkpoint(path: str | Path) -> dict:
    """Per compressed linear: format, bits, group size and the bits it really stores per weight
    (read from the safetensors headers, no tensor loaded); totals; ARMOR wrappers' overhead."""
    layers = read_manifest(path)["layers"]
    sizes, wrap = {}, {}
    for file in weight_files(path):
        with safetensors.safe_open(str(file), "pt") as f:
            for k in f.keys():
                mod, _, leaf = k.rpartition(".")
                if mod in layers and leaf != "bias":
                    sl = f.get_slice(k)
                    n = math.prod(sl.get_shape())
                    sizes[mod] = sizes.get(mod, 0) + n * 8 * SAFETENSORS_DTYPES[sl.get_dtype()].itemsize
                    if leaf in ("pre", "post"):    # ARMOR's block-diagonal wrappers
                        wrap[mod] = wrap.get(mod, 0) + n
    rows = {name: {"format": info["format"] + (f" {info['n']}:{info['m']}" if "n" in info else ""),
                   "bits": info.get("bits"), "group_size": info.get("group_size"),
                   "bpw": sizes[name] / (info["shape"][0] * info["shape"][1])}
            for name, info in layers.items()}
    total_w = sum(info["shape"][0] * info["shape"][1] for info in layers.values())
    res = {"layers": len(layers), "weights": total_w, "bits_per_weight": sum(sizes.values()) / total_w,
           "per_layer": rows}
    if wrap:
        res.update(wrapper_overhead(layers, wrap))
    return res


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (one file or shards), or a clear error for a missing or
    corrupt file."""
    tensors = {}
    for f in weight_files(path):
        if not f.is_file():
            raise QuantkitError(f"{path}: {f.name} is missing; the checkpoint is incomplete")
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise QuantkitError(f"{f}: corrupt safetensors file ({e}); re-run the quantization") from e
    return tensors


def packed_from_tensors(tensors: dict[str, torch.Tensor], manifest: dict) -> dict[str, PackedLinear]:
    """Rebuild every PackedLinear named in the manifest from the flat tensor dict (pops them)."""
    out = {}
    for name, info in manifest["layers"].items():
        prefix = f"{name}."
        keys = [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]
                and k[len(prefix):] not in ("bias", "weight")]
        if not keys:
            raise QuantkitError(f"checkpoint has no packed tensors for layer {name}")
        meta = {k: v for k, v in info.items() if k not in ("format", "shape")}
        out[name] = PackedLinear(info["format"], tuple(info["shape"]),
                                 {k[len(prefix):]: tensors.pop(k) for k in keys}, meta)
    return out
