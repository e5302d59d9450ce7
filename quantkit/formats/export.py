"""Exporters: a quantkit checkpoint rewritten in formats other tools load.

- bitsandbytes 8-bit (transformers' `load_in_8bit` checkpoints) for LLM.int8 layers.
- compressed-tensors `pack-quantized` (vLLM, transformers): int32 words along the input dim,
  signed codes stored with a 2^(b-1) offset, which is exactly our unsigned code, so the words
  are ours; zero points packed along the output dim; one config group per distinct scheme.
- GPTQ v1 (AutoGPTQ / GPTQModel / optimum): qweight [in/pack, out], qzeros [G, out/pack]
  holding zero - 1, scales [G, out], g_idx [in]; per-module `dynamic` overrides for the layers
  whose scheme differs from the base one.

The last two take affine int layers of 4 or 8 bits only (the widths their kernels run). Group sizes
that do not divide a layer's width (576 columns at g128) are re-expressed exactly with groups
of gcd(group, width) columns, repeating each scale. Layers that serving engines fuse
(q/k/v, gate/up) must share a scheme: a 4-bit member of a group with 8-bit ones is promoted
to 8 bits exactly (codes and zero shifted by 120, same scales), and the export says so
(`--tie-fused` at quantization gives such layers one width in the first place).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.io import INDEX, WEIGHTS, atomic_dir, check_output, load_tensors, packed_from_tensors, read_manifest, weight_files
from quantkit.formats.packed import PackedLinear, int_parts
from quantkit.formats.packing import pack
from quantkit.model.discovery import fused_groups

EXPORT_BITS = (4, 8)


@dataclass
class Layer:
    """One linear in export terms: unpacked codes and a grid whose groups divide the width."""
    codes: Tensor      # int32 [out, in], unsigned in [0, 2^bits)
    scales: Tensor     # fp32 [out, G]
    zeros: Tensor      # int32 [out, G]
    g_idx: Tensor      # int32 [in]
    bits: int
    group_size: int    # -1: one group per row
    sym: bool
    act_order: bool    # g_idx is not the contiguous map (GPTQ's desc_act)

    @property
    def scheme(self) -> tuple:
        return (self.bits, self.group_size, self.sym, self.act_order)


def _layer(name: str, p: PackedLinear, fmt: str) -> Layer:
    """Check that `fmt` can hold this layer and bring its groups to a size that divides the width."""
    if p.format != "int":
        raise QuantkitError(f"{name} is stored as {p.format!r}; {fmt} holds only affine integer layers "
                            "(re-quantize with --method gptq or rtn)")
    bits = p.meta["bits"]
    if bits not in EXPORT_BITS:
        raise QuantkitError(f"{name} has {bits}-bit weights; {fmt} kernels run only 4- and 8-bit "
                            "weights (re-quantize with --bits 4 or --bit-options 4,8)")
    codes, scales, zeros, g_idx = int_parts(p)
    out_f, in_f = p.shape
    gs = p.meta["group_size"]
    act_order = "g_idx" in p.tensors
    if gs <= 0 or gs >= in_f:
        gs, g_idx = -1, torch.zeros(in_f, dtype=torch.long)
    elif not act_order and in_f % gs:
        g = math.gcd(gs, in_f)                      # exact: each old group is whole new groups
        old = torch.arange(0, in_f, g) // gs
        scales, zeros, gs, g_idx = scales[:, old], zeros[:, old], g, torch.arange(in_f) // g
    elif act_order and fmt == "compressed-tensors":
        raise QuantkitError(f"{name} uses act-order groups (a g_idx column map), which "
                            "compressed-tensors no longer stores; re-quantize with `static_groups: true` "
                            "in the recipe (the default) or export with --format gptq")
    sym = bool(p.meta.get("sym", False))
    return Layer(codes, scales, zeros.round().to(torch.int32), g_idx.to(torch.int32), bits, gs, sym, act_order)


def _promote(layer: Layer) -> Layer:
    """4-bit codes as 8-bit ones with the same values: q+120, z+120, same scales."""
    off = (1 << 7) - (1 << (layer.bits - 1))
    return Layer(layer.codes + off, layer.scales, layer.zeros + off, layer.g_idx, 8,
                 layer.group_size, layer.sym, layer.act_order)


def _share_fused_schemes(layers: dict[str, Layer], fmt: str) -> list[str]:
    """Give fused siblings one scheme (promoting narrower codes); returns the promoted names."""
    promoted = []
    for members in fused_groups(list(layers)):
        widest = max(layers[m].bits for m in members)
        for m in members:
            if layers[m].bits < widest:
                layers[m] = _promote(layers[m])
                promoted.append(m)
        if len({layers[m].scheme for m in members}) > 1:
            raise QuantkitError(f"{fmt}: {', '.join(members)} are fused by serving engines but differ in "
                                f"group size, symmetry or act-order: {[layers[m].scheme for m in members]}")
    return promoted


def _exact_regex(names: list[str]) -> str:
    return "re:^(" + "|".join(re.escape(n) for n in names) + ")$"


def compressed_tensors(layers: dict[str, Layer]) -> tuple[dict[str, Tensor], dict]:
    """pack-quantized tensors and the quantization_config with one config group per scheme."""
    tensors, by_scheme = {}, {}
    for name, ly in layers.items():
        tensors[f"{name}.weight_packed"] = pack(ly.codes, ly.bits)
        tensors[f"{name}.weight_scale"] = ly.scales.to(torch.float16).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(ly.codes.shape), dtype=torch.int64)
        if not ly.sym:
            tensors[f"{name}.weight_zero_point"] = pack(ly.zeros.t(), ly.bits).t().contiguous()
        by_scheme.setdefault(ly.scheme, []).append(name)
    groups = {}
    for i, ((bits, gs, sym, _), names) in enumerate(sorted(by_scheme.items())):
        groups[f"group_{i}"] = {"targets": [_exact_regex(names)], "input_activations": None,
                                "output_activations": None,
                                "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                                            "strategy": "channel" if gs <= 0 else "group",
                                            "group_size": None if gs <= 0 else gs, "dynamic": False,
                                            "actorder": None, "observer": "minmax"}}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "quantization_status": "compressed", "config_groups": groups, "ignore": [],
              "kv_cache_scheme": None}
    return tensors, config


def gptq(layers: dict[str, Layer]) -> tuple[dict[str, Tensor], dict]:
    """GPTQ v1 tensors (zero - 1 stored) and its config, `dynamic` overrides for minority schemes."""
    tensors = {}
    for name, ly in layers.items():
        if not ly.sym and bool((ly.zeros == 0).any()):
            raise QuantkitError(f"{name} has zero point 0 in some group, which GPTQ v1 stores as -1 and its "
                                "loaders read back as 2^bits; export with --format compressed-tensors "
                                "or quantize with --sym")
        out_f, in_f = ly.codes.shape
        if in_f % (32 // ly.bits) or out_f % (32 // ly.bits):
            raise QuantkitError(f"{name}: GPTQ packs {32 // ly.bits} codes per word along both dims; "
                                f"shape {out_f}x{in_f} does not divide")
        tensors[f"{name}.qweight"] = pack(ly.codes, ly.bits).t().contiguous()
        tensors[f"{name}.qzeros"] = pack(((ly.zeros - 1) & ((1 << ly.bits) - 1)).t(), ly.bits).contiguous()
        tensors[f"{name}.scales"] = ly.scales.t().to(torch.float16).contiguous()
        tensors[f"{name}.g_idx"] = ly.g_idx.contiguous()
    counts = Counter(ly.scheme for ly in layers.values())
    base = counts.most_common(1)[0][0]
    bits, gs, sym, act = base
    dynamic = {}
    for scheme in counts:
        if scheme != base:
            names = [n for n, ly in layers.items() if ly.scheme == scheme]
            dynamic["+:" + _exact_regex(names)[3:]] = {"bits": scheme[0], "group_size": scheme[1],
                                                        "sym": scheme[2], "desc_act": scheme[3]}
    config = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": gs,
              "sym": sym, "desc_act": act, "pack_dtype": "int32", "true_sequential": True}
    if dynamic:
        config["dynamic"] = dynamic
    return tensors, config


def bnb_int8(packed: dict[str, PackedLinear], src: Path) -> tuple[dict[str, Tensor], dict, dict]:
    """bitsandbytes 8-bit layers as transformers saves them: int8 `weight`, fp32 `SCB` (row absmax)."""
    from quantkit.model.discovery import LINEAR_TYPES
    from quantkit.model.loader import build_empty, load_config
    tensors, notes = {}, []
    for name, p in packed.items():
        if p.format != "llm-int8":
            raise QuantkitError(f"{name} is stored as {p.format!r}; bnb-int8 holds LLM.int8 layers only "
                                "(quantize with --method llm-int8 --bits 8)")
        tensors[f"{name}.weight"] = p.tensors["qweight"]
        tensors[f"{name}.SCB"] = p.tensors["absmax"].float()
        tensors[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)   # "row"
        if "outlier_cols" in p.tensors:
            notes.append(name)
    config = load_config(str(src))
    del config.quantization_config
    skip = [n for n, m in build_empty(config).named_modules() if isinstance(m, LINEAR_TYPES) and n not in packed]
    qconfig = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
               "llm_int8_threshold": next(iter(packed.values())).meta["threshold"],
               "llm_int8_skip_modules": skip, "llm_int8_has_fp16_weight": False,
               "llm_int8_enable_fp32_cpu_offload": False}
    extra = {"schemes": {"int8 row-wise": len(packed)}, "promoted_to_8_bits": []}
    if notes:
        extra["note"] = (f"{len(notes)} layers keep calibrated outlier columns in fp16; bitsandbytes "
                         "computes them from the int8 weights instead")
    return tensors, qconfig, extra


def _int_writer(fn, fmt: str):
    """A writer over affine int layers: checked, regrouped and fused-promoted first."""
    def writer(packed: dict[str, PackedLinear], src: Path) -> tuple[dict[str, Tensor], dict, dict]:
        layers = {name: _layer(name, p, fmt) for name, p in packed.items()}
        promoted = _share_fused_schemes(layers, fmt)
        tensors, qconfig = fn(layers)
        schemes = Counter(f"{ly.bits}-bit g{ly.group_size}" for ly in layers.values())
        return tensors, qconfig, {"schemes": dict(schemes), "promoted_to_8_bits": promoted}
    return writer


WRITERS = {"compressed-tensors": _int_writer(compressed_tensors, "compressed-tensors"),
           "gptq": _int_writer(gptq, "gptq"), "bnb-int8": bnb_int8}


def export(src: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> dict:
    """Write checkpoint `src` in format `fmt` to `out` (atomically); returns a summary."""
    if fmt not in WRITERS:
        raise QuantkitError(f"unknown export format {fmt!r}; choose one of: {', '.join(WRITERS)}")
    src = Path(src)
    if not src.is_dir():
        raise QuantkitError(f"{src}: no such checkpoint directory")
    check_output(out, overwrite)
    manifest = read_manifest(src)
    tensors = load_tensors(src)
    packed = packed_from_tensors(tensors, manifest)
    online = [n for n, p in packed.items() if "input_hadamard" in p.meta]
    if online:
        raise QuantkitError(f"{online[0]} (and {len(online) - 1} more) multiply their input by an online "
                            f"Hadamard at run time (RSQ), which {fmt} loaders do not do; to export, "
                            "quantize without them: a uniform GPTQ run (`quantkit quantize llama --bits 4`), "
                            "or under --alloc `--method gptq --bit-options 4,8 --tie-fused`")
    quant_tensors, qconfig, extra = WRITERS[fmt](packed, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig
    skip = {"config.json", INDEX, *(f.name for f in weight_files(src))}
    with atomic_dir(out, overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        save_file({**tensors, **quant_tensors}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return {"format": fmt, "out": str(out), "layers": len(packed), **extra}
