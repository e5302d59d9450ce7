"""bitsandbytes NF4 (blocksize 64 by default) on every block linear, dequantized back.

bitsandbytes' own quantize_4bit / dequantize_4bit, run on CPU on the fp32 weights; the
absmax of each block is kept in fp32 (no double quantization). 4-bit only.
"""
from __future__ import annotations

from common import block_linears, load_model, main, timed, version


def quantize_all(linears: dict, blocksize: int) -> dict:
    import bitsandbytes.functional as F
    out = {}
    for name, lin in linears.items():
        q, state = F.quantize_4bit(lin.weight.data, blocksize=blocksize, quant_type="nf4")
        out[name] = F.dequantize_4bit(q, state).float()
    return out


def quantize(a):
    if a.bits != 4:
        raise ValueError(f"NF4 is a 4-bit format: no {a.bits}-bit setting")
    model, _ = load_model(a.model_dir)
    weights, seconds, rss = timed(quantize_all, block_linears(model), a.group_size)
    return weights, {"quant_seconds": seconds, "peak_rss_mb": rss,
                     "version": version("bitsandbytes"),
                     "bits_per_weight": 4 + 32 / a.group_size,
                     "bpw_formula": f"4 + 32 fp32 absmax / {a.group_size} (no double quant)",
                     "settings": {"quant_type": "nf4", "blocksize": a.group_size,
                                  "compress_statistics": False}}


if __name__ == "__main__":
    main(quantize)
