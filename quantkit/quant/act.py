"""Activation quantization for image models: one scale per tensor, unsigned when the calibration
activations are non-negative (after ReLU/ReLU6), the range found by an MSE search and optionally
learned afterwards (LSQ: the step size gets a straight-through gradient, scaled by
1/sqrt(n·qmax))."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _round_ste(x: Tensor) -> Tensor:
    return (x.round() - x).detach() + x


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a `bits`-bit activation code."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor:
    """scale · clamp(round(x / scale)): exactly an integer times the scale."""
    lo, hi = qrange(bits, signed)
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def mse_scale(x: Tensor, bits: int, signed: bool, grid: int = 100, p: float = 2.0) -> Tensor:
    """The per-tensor scale minimising mean |x - q(x)|^p over clip ratios 0.01..1 of max|x|."""
    x = x.detach().float().flatten()
    if x.numel() > 1 << 20:                         # a fixed subsample: the range, not every value
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20]]
    lo, hi = qrange(bits, signed)
    top = x.abs().max().clamp_min(1e-8)
    best, best_err = top / hi, float("inf")
    for r in torch.linspace(0.01, 1.0, grid):
        s = r * top / hi
        err = float((x - fake_quant(x, s, bits, signed)).abs().pow(p).mean())
        if err < best_err:
            best, best_err = s, err
    return best.clone()


class ActQuantizer(nn.Module):
    """Fake-quantizes a tensor on a per-tensor grid; `calibrate` sets signedness and scale from
    data, `learn` makes the scale an LSQ parameter. Disabled (identity) until calibrated."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.signed = True
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.enabled = False
        self.drop_prob = 0.0       # QDrop: the share of values passed through unquantized

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        self.signed = bool(x.min() < 0)
        self.scale.data = mse_scale(x, self.bits, self.signed).to(self.scale)
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        lo, hi = qrange(self.bits, self.signed)
        s = self.scale
        if s.requires_grad:                                  # LSQ: gradient-scaled step size
            g = 1.0 / (x.numel() / x.shape[0] * hi) ** 0.5
            s = (s - s * g).detach() + s * g
            q = torch.clamp(_round_ste(x / s), lo, hi) * s
        else:
            q = fake_quant(x, s, self.bits, self.signed)
        if self.drop_prob > 0:
            return torch.where(torch.rand_like(x) < self.drop_prob, x, q)
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, scale={float(self.scale):.4g}"


def attach_input_quantizers(model: nn.Module, bits: dict[str, int]) -> dict[str, ActQuantizer]:
    """An ActQuantizer on the input of each named layer (bits per layer), run by a forward
    pre-hook so the layer keeps its class and attributes (HF's tf_padding reads them)."""
    quantizers = {}
    for name, b in bits.items():
        layer = model.get_submodule(name)
        q = ActQuantizer(b)
        layer.input_quantizer = q            # registered as a submodule: saved with the model
        layer.register_forward_pre_hook(lambda mod, args: (mod.input_quantizer(args[0]),) + args[1:])
        quantizers[name] = q
    return quantizers
