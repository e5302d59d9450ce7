"""llm-compressor's GPTQModifier (W4A16-style: symmetric int weights, groups along the input,
activations untouched) through oneshot() on our calibration tokens, dequantized back.

The scheme is W4A16's weights with group_size and num_bits set (W3A16 is no preset, so both
widths go through config_groups); targets Linear, lm_head ignored; GPTQModifier's defaults
otherwise (block_size 128, dampening_frac 0.01, actorder static). After oneshot each linear's
weight is re-fake-quantized from its weight_scale / weight_zero_point (a no-op when GPTQ left
it on the grid: the worker reports the largest difference).
"""
from __future__ import annotations

from common import block_linears, load_calib, load_model, main, timed, version


def recipe(bits: int, group_size: int):
    from llmcompressor.modifiers.quantization import GPTQModifier
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "dynamic": False}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    return GPTQModifier(config_groups=groups, ignore=["lm_head"])


def calib_dataset(tokens):
    import torch
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": tokens.tolist(),
                              "attention_mask": torch.ones_like(tokens).tolist()})


def dense_weights(model) -> tuple[dict, float]:
    """{name: fake-quantized weight} and the largest |re-fake-quantized - stored weight|."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    out, worst = {}, 0.0
    for name, m in block_linears(model).items():
        if getattr(m, "weight_g_idx", None) is not None:
            raise RuntimeError(f"{name} has a g_idx: groups are not contiguous")
        q = fake_quantize(m.weight.data, m.weight_scale.data, m.weight_zero_point.data,
                          m.quantization_scheme.weights)
        worst = max(worst, (q.float() - m.weight.data.float()).abs().max().item())
        out[name] = q.float()
    return out, worst


def quantize(a):
    from llmcompressor import oneshot
    model, tok = load_model(a.model_dir)
    tokens = load_calib(a.calib)
    ds = calib_dataset(tokens)
    bs = int(a.options.get("batch_size", 8))
    model, seconds, rss = timed(oneshot, model=model, tokenizer=tok, dataset=ds,
                                recipe=recipe(a.bits, a.group_size), batch_size=bs,
                                num_calibration_samples=len(tokens),
                                max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
    weights, worst = dense_weights(model)
    return weights, {"quant_seconds": seconds, "peak_rss_mb": rss,
                     "version": version("llmcompressor"),
                     "versions": {"compressed-tensors": version("compressed-tensors"),
                                  "transformers": version("transformers")},
                     "bits_per_weight": a.bits + 16 / a.group_size,
                     "bpw_formula": f"{a.bits} + 16 fp16 scale / {a.group_size} "
                                    "(symmetric: no zero point stored)",
                     "refake_quant_max_diff": worst,
                     "settings": {"symmetric": True, "block_size": 128, "dampening_frac": 0.01,
                                  "actorder": "static", "batch_size": bs,
                                  "n_samples": len(tokens), "seqlen": tokens.shape[1]}}


if __name__ == "__main__":
    main(quantize)
