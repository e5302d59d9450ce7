"""Genie-D distillation: per batch, a fresh generator and its latents trained jointly so that the
batch statistics of every BatchNorm's input match the running ones (plus the input prior),
with swing convolution on every strided conv during distillation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantkit.calib.bnstats import SwingConvs, optimise_batches
from quantkit.registry import register


@dataclass
class GenieConfig:
    iterations: int = 200           # per batch; the reference runs 4000 (GPU). 200 fits a CPU.
    batch_size: int = 128
    latent: int = 256
    width: int = 128                # generator channels
    lr_latent: float = 0.1          # the values the reference runs (its two lr flags are swapped)
    lr_generator: float = 0.01
    patience: int = 100
    class_weight: float = 0.0       # > 0: also cross-entropy toward a random class per image
                                    # (GDFQ / DeepInversion's term; Genie-D itself has none)


class Generator(nn.Module):
    """latent -> Linear -> BN -> up -> conv -> BN -> LeakyReLU -> up -> conv -> tanh -> BN (no
    affine, train mode): the output's per-channel batch statistics are 0 and 1 by construction."""

    def __init__(self, shape: tuple[int, int, int], latent: int = 256, width: int = 128):
        super().__init__()
        c, h, w = shape
        self.h0, self.w0, self.width = -(-h // 4), -(-w // 4), width
        self.size = (h, w)
        self.fc = nn.Linear(latent, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c, 3, padding=1)
        self.out = nn.BatchNorm2d(c, affine=False)

    def forward(self, z: Tensor) -> Tensor:
        x = self.bn0(self.fc(z).view(-1, self.width, self.h0, self.w0))
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = torch.tanh(self.conv2(x))[..., :self.size[0], :self.size[1]]
        return self.out(x)


@register("calib", "genie", section="genie", config=GenieConfig)
def distill_genie(model: nn.Module, n: int, shape: tuple[int, int, int], seed: int = 0,
                  config: GenieConfig | None = None, progress: bool = True,
                  history: list | None = None) -> Tensor:
    """n synthetic model inputs [n, *shape]; history gets (first, last) loss per batch."""
    cfg = config or GenieConfig()
    gen = torch.Generator().manual_seed(seed)

    def make(b: int):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        g = Generator(shape, cfg.latent, cfg.width).train()   # train-mode BN: batch statistics
        z = torch.randn(b, cfg.latent, generator=gen).requires_grad_(True)
        opt_z = torch.optim.Adam([z], lr=cfg.lr_latent)
        opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_generator)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, min_lr=1e-4, patience=cfg.patience)
        decay = torch.optim.lr_scheduler.StepLR(opt_g, step_size=100, gamma=0.95)
        return (lambda: g(z)), [opt_z, opt_g], [plateau], [decay]
    return optimise_batches(model, n, cfg.batch_size, cfg.iterations, False, make, "genie",
                            progress, history, context=lambda: SwingConvs(model, gen),
                            class_weight=cfg.class_weight, generator=gen)
