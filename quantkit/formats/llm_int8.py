"""The "llm-int8" format (LLM.int8(), Dettmers et al.): int8 weights with one absmax per row.

W ≈ q · absmax[row] / 127, q = round(127 · w / absmax) in [-127, 127]: the layout bitsandbytes'
8-bit layers store (`weight` int8 + `SCB`). What makes it LLM.int8 is the matmul (kernels):
activations are quantized row-wise to int8 too, except the input features holding outliers
(|x| >= meta["threshold"], 6.0 by default), which go through a 16-bit matmul.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.packed import PackedLinear, register_format

DEFAULT_THRESHOLD = 6.0


def make_llm_int8(W: Tensor, threshold: float = DEFAULT_THRESHOLD,
                  outlier_cols: Tensor | None = None) -> PackedLinear:
    """Row-wise absmax int8 codes of W [out, in]; `threshold` is the run-time outlier bound.

    outlier_cols: input features known (from calibration) to carry outliers; their weight
    columns are also kept in fp16, so that their 16-bit matmul uses 16-bit weights, as in the
    paper, rather than the int8 ones (whose step is set by the row's largest weight).
    """
    absmax = W.abs().amax(1).float()
    q = torch.round(W * (127 / absmax.clamp(min=1e-12))[:, None]).clamp(-127, 127).to(torch.int8)
    tensors = {"qweight": q.contiguous(), "absmax": absmax}
    if outlier_cols is not None and outlier_cols.numel():
        cols = outlier_cols.to(torch.int32).sort().values
        tensors["outlier_cols"] = cols
        tensors["outlier_weight"] = W[:, cols.long()].to(torch.float16).contiguous()
    meta = {"bits": 8, "group_size": -1, "sym": True, "threshold": float(threshold)}
    return PackedLinear("llm-int8", tuple(W.shape), tensors, meta)


def llm_int8_storage_bits(out_f: int, in_f: int) -> int:
    """Bits make_llm_int8 stores without fp16 outlier columns: int8 codes and fp32 absmax."""
    return out_f * (8 * in_f + 32)


@register_format("llm-int8")
def _dequantize(p: PackedLinear) -> Tensor:
    W = p.tensors["qweight"].float() * (p.tensors["absmax"].float() / 127)[:, None]
    if "outlier_cols" in p.tensors:
        W[:, p.tensors["outlier_cols"].long()] = p.tensors["outlier_weight"].float()
    return W


def outlier_columns(p: PackedLinear, detected: Tensor) -> tuple[Tensor, Tensor]:
    """(columns for the 16-bit matmul, their weights fp32 [out, k]): the stored outlier columns
    (fp16 weights) and any other column detected in this batch (dequantized int8 weights)."""
    stored = p.tensors.get("outlier_cols")
    cols = detected if stored is None else torch.unique(torch.cat([stored.long(), detected]))
    w = p.tensors["qweight"][:, cols].float() * (p.tensors["absmax"].float() / 127)[:, None]
    if stored is not None:
        w[:, torch.searchsorted(cols, stored.long())] = p.tensors["outlier_weight"].float()
    return cols, w


def detect_outliers(x: Tensor, threshold: float) -> Tensor:
    """Input features of x [M, K] with any |x| >= threshold."""
    return (x.abs() >= threshold).any(0).nonzero().squeeze(1)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8 of x [M, K]: (codes int8, absmax fp32 [M])."""
    c = x.abs().amax(1).float()
    q = torch.round(x.float() * (127 / c.clamp(min=1e-12))[:, None]).clamp(-127, 127).to(torch.int8)
    return q, c
