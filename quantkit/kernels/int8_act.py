"""W8A8 for image models: int8 activations times int8 weights in int32 (torch._int_mm), then one
float rescale. Exact integer arithmetic, so it matches the fake-quant reference up to the float
rounding of the final rescale.

An 8-bit code in [0, 255] (unsigned activation, or an asymmetric weight) is shifted by 128 into
int8; the shifts come back as rank-one integer corrections:
    Σ_k a_k (w_k − z) = Σ (a'_k + α)(w'_k + 128 − z),  a' = a − α, w' = w − 128
                      = a'·w' + (128 − z) Σ a'_k + α Σ w'_k + α K (128 − z).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantkit.formats.packed import PackedLinear, int_parts


def supports(p: PackedLinear, act_bits: int | None) -> bool:
    """8-bit per-output-channel integer weights with an 8-bit input."""
    return (p.format == "int" and p.meta.get("bits") == 8 and act_bits == 8
            and p.meta.get("group_size") == -1 and hasattr(torch, "_int_mm"))


class Int8Matmul:
    """y [M, N] = s_x · s_w ⊙ (a_int [M, K] @ (w − z)ᵀ) for one layer's packed weight."""

    def __init__(self, p: PackedLinear):
        codes, scales, zeros, _ = int_parts(p)
        self.K = codes.shape[1]
        self.w = (codes - 128).to(torch.int8).t().contiguous()             # [K, N]
        self.shift = (128 - zeros[:, 0]).round().to(torch.int32)           # 128 − z, [N]
        self.wsum = self.w.to(torch.int32).sum(0)                          # Σ_k w'_k, [N]
        self.scale = scales[:, 0].float()

    def __call__(self, a: Tensor, s_x: Tensor, signed: bool) -> Tensor:
        alpha = 0 if signed else 128
        a8 = (a - alpha).to(torch.int8)
        M = a8.shape[0]
        if M > 16 and self.K % 8 == 0 and self.w.shape[1] % 8 == 0:
            acc = torch._int_mm(a8, self.w)
        else:                                  # shapes _int_mm refuses: the same sums in int32
            acc = a8.to(torch.int32) @ self.w.to(torch.int32)
        acc += self.shift[None] * a8.to(torch.int32).sum(1, keepdim=True)
        if alpha:
            acc += alpha * (self.wsum + self.K * self.shift)[None]
        return acc.float() * (s_x * self.scale)[None]


def install(mod: nn.Module, p: PackedLinear) -> None:
    """Run `mod` (a Conv2d or Linear with an 8-bit input quantizer) through Int8Matmul. The
    module object stays (its attributes are read by some models' padding code)."""
    kernel, q = Int8Matmul(p), mod.input_quantizer

    def forward(x: Tensor) -> Tensor:          # x: already fake-quantized by the pre-hook
        codes = torch.round(x / q.scale)
        if isinstance(mod, nn.Linear):
            y = kernel(codes.reshape(-1, x.shape[-1]), q.scale, q.signed)
            y = y.reshape(*x.shape[:-1], -1)
            return y if mod.bias is None else y + mod.bias
        for name, child in mod.named_children():
            if name != "input_quantizer":
                codes = child(codes)            # e.g. static same-padding: zeros stay zeros
        n, _, h, w = codes.shape
        cols = F.unfold(codes, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        oh = (h + 2 * mod.padding[0] - mod.dilation[0] * (mod.kernel_size[0] - 1) - 1) // mod.stride[0] + 1
        ow = (w + 2 * mod.padding[1] - mod.dilation[1] * (mod.kernel_size[1] - 1) - 1) // mod.stride[1] + 1
        y = kernel(cols.transpose(1, 2).reshape(-1, cols.shape[1]), q.scale, q.signed)
        y = y.reshape(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow)
        return y if mod.bias is None else y + mod.bias.view(1, -1, 1, 1)
    mod.forward = forward
