"""HQQ (half-quadratic quantization, data-free) on every block linear, dequantized back.

Settings: hqq's BaseQuantizeConfig(nbits, group_size) as it comes (axis=1, optimize=True,
round_zero for 4-bit), compute dtype fp16 (its default; scale and zero are stored in it).
"""
from __future__ import annotations

from common import block_linears, load_model, main, timed, version


def quantize_all(linears: dict, bits: int, group_size: int) -> dict:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    out = {}
    for name, lin in linears.items():
        h = HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
        out[name] = h.dequantize().float()
    return out


def quantize(a):
    if a.bits not in (1, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"hqq has no {a.bits}-bit setting")
    model, _ = load_model(a.model_dir)
    weights, seconds, rss = timed(quantize_all, block_linears(model), a.bits, a.group_size)
    return weights, {"quant_seconds": seconds, "peak_rss_mb": rss, "version": version("hqq"),
                     "bits_per_weight": a.bits + 32 / a.group_size,
                     "bpw_formula": f"{a.bits} + (16 fp16 scale + 16 fp16 zero) / {a.group_size}",
                     "settings": {"axis": 1, "optimize": True, "round_zero": a.bits == 4,
                                  "compute_dtype": "float16"}}


if __name__ == "__main__":
    main(quantize)
