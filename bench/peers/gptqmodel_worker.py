"""GPTQModel's GPTQ on our calibration tokens, on CPU, dequantized back from its packed layers.

QuantizeConfig(bits, group_size) with GPTQModel's defaults otherwise (sym=True, damp,
desc_act / act_group_aware as the release sets them); the packed layers are turned back into
dense weights with their own dequantize_weight().
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from common import BLOCK_LINEAR, load_calib, main, timed, version


PACKED = ("qweight", "qzeros", "scales", "g_idx")


def dense_weights(hf_model, shapes: dict, nbits: int) -> tuple[dict, float]:
    """({name: dense [out, in]} from every packed block layer, stored bits per weight).

    Freshly packed layers hold v1 (checkpoint) zero points, stored minus one, but
    dequantize_weight reads v2: they are converted first, as GPTQModel does on load."""
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    out, bits = {}, 0
    for name, m in hf_model.named_modules():
        if BLOCK_LINEAR.match(name) and hasattr(m, "dequantize_weight"):
            if m.qzero_format() == 1:
                convert_gptq_v1_to_v2_format_module(m, nbits, m.qzeros.dtype)
            w = m.dequantize_weight().float().t().contiguous()       # it returns [in, out]
            if tuple(w.shape) != shapes[name]:
                raise RuntimeError(f"{name}: dequantized {tuple(w.shape)}, expected {shapes[name]}")
            out[name] = w
            bits += sum(t.numel() * t.element_size() * 8 for k in PACKED
                        if (t := getattr(m, k, None)) is not None)
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise RuntimeError(f"{len(missing)} block linears not packed, e.g. {missing[0]}")
    return out, bits / sum(a * b for a, b in shapes.values())


def setup_env() -> None:
    """GPTQModel's side files go beside its venv, not into ~/.cache/gptqmodel and /tmp."""
    home = Path(sys.prefix).parent                 # ~/.cache/quantkit/peers/gptqmodel
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(home / "torch_extensions"))
    os.environ.setdefault("HF_HOME", str(home / "hf_home"))     # tokenicer's default: /tmp
    # GPTQModel sizes its CPU pool as (cores + 1) // 2 but its model loader asks for 2 workers:
    # on a 2-core machine that fails ("requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def warm_jit() -> float:
    """Build (first run, ~25 s) or load GPTQModel's CPU packing extension outside the timing."""
    from gptqmodel.utils.cpp import load_pack_block_extension
    t = time.perf_counter()
    load_pack_block_extension()
    return time.perf_counter() - t


def quantize(a):
    setup_env()
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    jit_seconds = warm_jit()
    tokens = load_calib(a.calib)
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, offload_to_disk=False)
    model = GPTQModel.load(a.model_dir, cfg, device="cpu", dtype=torch.float32)
    shapes = {n: tuple(m.weight.shape) for n, m in model.model.named_modules()
              if BLOCK_LINEAR.match(n) and isinstance(m, torch.nn.Linear)}
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in tokens]
    bs = int(a.options.get("batch_size", 8))
    _, seconds, rss = timed(model.quantize, calib, batch_size=bs, backend=BACKEND.TORCH)
    weights, bpw = dense_weights(model.model, shapes, a.bits)
    return weights, {"quant_seconds": seconds, "peak_rss_mb": rss, "version": version("gptqmodel"),
                     "jit_warmup_seconds": jit_seconds,
                     "bits_per_weight": bpw,
                     "bpw_formula": "stored bits of qweight + qzeros + scales + g_idx / weights "
                                    f"(~ {a.bits} + (16 fp16 scale + {a.bits}-bit zero) / "
                                    f"{a.group_size} + 32 / out_features; GPTQ format keeps "
                                    "qzeros even when sym)",
                     "settings": {k: str(getattr(model.quantize_config, k, None))
                                  for k in ("sym", "desc_act", "act_group_aware", "damp_percent",
                                            "static_groups", "mse", "true_sequential")}
                     | {"batch_size": bs, "n_samples": len(tokens)}}


if __name__ == "__main__":
    main(quantize)
