"""LLM.int8() (Dettmers et al.): vector-wise int8 weights; outliers are handled at run time.

The weight side is row-wise absmax int8 (no calibration needed); the activation side (row-wise
int8 with the outlier input features in 16 bits) is the format's matmul (kernels/llm_int8.py).
Under mixed precision, widths below 8 bits, which LLM.int8 does not define, are quantized by
GPTQ (weight-only), so `--alloc ip --method llm-int8` keeps the sensitive layers in LLM.int8
and packs the rest into 2-4 bits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

from quantkit.formats.llm_int8 import DEFAULT_THRESHOLD, llm_int8_storage_bits, make_llm_int8
from quantkit.formats.packed import PackedLinear, int_storage_bits
from quantkit.quant.base import LayerStats, QSpec
from quantkit.quant.gptq import gptq
from quantkit.registry import register

MAX_FP16_COLUMNS = 100   # keep at most in_features / 100 weight columns in fp16


@dataclass
class LLMInt8Config:
    """The recipe's `llm_int8:` section."""
    threshold: float = DEFAULT_THRESHOLD  # input features with |x| >= this take the 16-bit path


@register("compressor", "llm-int8", section="llm_int8", config=LLMInt8Config,
          options=lambda recipe: asdict(recipe.section("llm_int8", LLMInt8Config)))
def llm_int8(W: Tensor, stats: LayerStats | None, spec: QSpec,
             threshold: float = DEFAULT_THRESHOLD) -> PackedLinear:
    """8 bits: row-wise absmax int8 (group size and grid options do not apply), the calibration's
    largest outlier features (|x| >= threshold; at most 1% of the inputs, which bounds the fp16
    columns' storage) kept with fp16 weight columns; below 8 bits: GPTQ."""
    if spec.bits == 8:
        cols = None
        if stats is not None and stats.act_absmax is not None:
            top = stats.act_absmax.topk(max(1, W.shape[1] // MAX_FP16_COLUMNS)).indices
            cols = top[stats.act_absmax[top] >= threshold]
        return make_llm_int8(W.float(), threshold, cols)
    if stats is None:
        raise ValueError("llm-int8 below 8 bits runs GPTQ, which needs calibration statistics")
    return gptq(W, stats, spec)


def _storage_floor(out_f: int, in_f: int, spec: QSpec) -> int:
    """The fewest bits a layer can take: no outlier columns at 8 bits, GPTQ's grid below."""
    if spec.bits == 8:
        return llm_int8_storage_bits(out_f, in_f)
    return int_storage_bits(out_f, in_f, spec.bits, spec.group_size, spec.sym)


llm_int8.storage_floor = _storage_floor
