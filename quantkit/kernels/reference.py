"""The oracle: dequantize with PackedLinear.dequantize(), then a dense matmul."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from quantkit.formats.packed import PackedLinear


def prepare(packed: PackedLinear, bias: Tensor | None):
    """forward(x) = x @ dequantize()ᵀ + bias, in x's dtype; dequantizes on every call."""
    def forward(x: Tensor) -> Tensor:
        W = packed.dequantize().to(x.device, x.dtype)
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))
    return forward
