"""LLM.int8() matmuls for the "llm-int8" format: int8 x int8 with outlier features in 16 bits.

y = (X₈ W₈ᵀ) ⊙ (c_x c_wᵀ) / 127² + X[:, O] Ŵ[:, O]ᵀ, where O are the input features with any
|x| >= threshold in this batch plus those calibration found (stored with fp16 weight columns),
X₈ the other features quantized per row (absmax c_x) and Ŵ the dequantized weight. Three implementations of the same contract:
- `emulated`: the integer product exactly in float64 (the oracle of this format's arithmetic);
- `cpu`: torch._int_mm (int8 x int8 -> int32) for the integer product;
- `bnb`: bitsandbytes' own int8 matmul (its CUDA kernels on GPU; also runs on CPU).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from quantkit.formats.llm_int8 import detect_outliers, outlier_columns, quantize_rows
from quantkit.formats.packed import PackedLinear


def _bnb():
    """bitsandbytes, imported on first use (its import is slow and loads its own backends)."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def supports(p: PackedLinear) -> bool:
    return p.format == "llm-int8"


def supports_bnb(p: PackedLinear) -> bool:
    return supports(p) and _bnb() is not None


def _prepare(p: PackedLinear, bias: Tensor | None, int_product: Callable[[Tensor, Tensor], Tensor]):
    q, absmax, thr = p.tensors["qweight"], p.tensors["absmax"].float(), p.meta["threshold"]
    out_f, in_f = p.shape
    w_scale = absmax / 127
    fixed = outlier_columns(p, torch.zeros(0, dtype=torch.long)) if "outlier_cols" in p.tensors else None

    def forward(x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, in_f).float()
        detected = detect_outliers(x2, thr)
        cols, w16 = fixed if fixed is not None and bool(torch.isin(detected, fixed[0]).all()) \
            else outlier_columns(p, detected)
        rest = x2
        if cols.numel():
            rest = x2.clone()
            rest[:, cols] = 0
        x8, cx = quantize_rows(rest)
        y = int_product(x8, q).float() * ((cx / 127)[:, None] * w_scale[None, :])
        if cols.numel():  # the outlier features through a 16-bit matmul
            y = y + x2[:, cols] @ w16.t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], out_f)
    return forward


def prepare_emulated(p: PackedLinear, bias: Tensor | None):
    """The format's arithmetic with the integer product done exactly in float64."""
    return _prepare(p, bias, lambda x8, q: x8.double() @ q.double().t())


def prepare_cpu(p: PackedLinear, bias: Tensor | None):
    """torch._int_mm for the integer product (int32 accumulation, exact)."""
    return _prepare(p, bias, lambda x8, q: torch._int_mm(x8, q.t()))


def prepare_bnb(p: PackedLinear, bias: Tensor | None):
    """bitsandbytes.matmul with our codes as its CB/SCB state (16-bit activations)."""
    bnb = _bnb()
    state = bnb.MatmulLtState()
    state.CB, state.SCB = p.tensors["qweight"], p.tensors["absmax"].float()
    state.has_fp16_weights, state.is_training = False, False
    state.threshold = p.meta["threshold"]

    fix = None
    if "outlier_cols" in p.tensors:  # bnb computes these columns from int8 weights: correct to fp16
        cols = p.tensors["outlier_cols"].long()
        deq = p.tensors["qweight"][:, cols].float() * (state.SCB / 127)[:, None]
        fix = cols, (p.tensors["outlier_weight"].float() - deq).t()

    def forward(x: Tensor) -> Tensor:
        x16 = x if x.dtype in (torch.float16, torch.bfloat16) else x.half()
        b = None if bias is None else bias.to(x16.dtype)
        y = bnb.matmul(x16, state.CB, state=state, threshold=state.threshold, bias=b).to(x.dtype)
        if fix is not None:
            y = y + (x[..., fix[0]].float() @ fix[1]).to(x.dtype)
        return y
    return forward
