"""ZeroQ distillation: images whose per-image BatchNorm-input statistics match every BN's running
mean and std (and the input prior), found by Adam on the pixels; no data, no labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.calib.bnstats import optimise_batches
from quantkit.registry import register


@dataclass
class ZeroQConfig:
    iterations: int = 500
    lr: float = 0.5
    batch_size: int = 32
    patience: int = 100             # ReduceLROnPlateau on the loss, every iteration
    # The reference starts from pixels of std ~0.014 (it divides by the variance where its
    # comment says std); quantkit starts where the input prior it optimises points: std 1.
    init_std: float = 1.0


@register("calib", "zeroq", section="zeroq", config=ZeroQConfig)
def distill_zeroq(model: nn.Module, n: int, shape: tuple[int, int, int], seed: int = 0,
                  config: ZeroQConfig | None = None, progress: bool = True,
                  history: list | None = None) -> Tensor:
    """n synthetic model inputs [n, *shape] (in the model's input space). history, when given,
    gets (first loss, last loss) of every batch."""
    cfg = config or ZeroQConfig()
    gen = torch.Generator().manual_seed(seed)

    def make(b: int):
        x = (torch.randn((b, *shape), generator=gen) * cfg.init_std).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=cfg.patience)
        return (lambda: x), [opt], [plateau], []
    return optimise_batches(model, n, cfg.batch_size, cfg.iterations, True, make, "zeroq",
                            progress, history)
