"""What data-free distillation optimises: how far the statistics of every BatchNorm's input
are from that BN's running mean and std, plus the input prior (mean 0, std 1 per channel), and
Genie's swing convolution (a random one-pixel shift before every strided conv)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError

EPS = 1e-6                 # as the references: sigma_BN = sqrt(running_var + 1e-6)


def _stats(x: Tensor, per_image: bool) -> tuple[Tensor, Tensor]:
    """(mean, std) per image and channel [B, C] over space, or per channel [C] over the batch."""
    dims = (2, 3) if per_image else (0, 2, 3)
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, (var + EPS).sqrt()


def stat_loss(x: Tensor, mean: Tensor, std: Tensor, per_image: bool) -> Tensor:
    """‖μ − μ̂‖² + ‖σ − σ̂‖², divided by the batch size (summed over images and channels)."""
    m, s = _stats(x, per_image)
    return ((m - mean).pow(2).sum() + (s - std).pow(2).sum()) / x.shape[0]


class BNStatLoss:
    """Calling it runs the model on x and returns Σ_BN stat_loss + the input prior term.

    per_image: ZeroQ's statistics (each image's own, over space); otherwise Genie's (the
    batch's, over batch and space). The model must be in eval mode: running stats stay."""

    def __init__(self, model: nn.Module, per_image: bool, class_weight: float = 0.0,
                 generator: torch.Generator | None = None):
        self.model, self.per_image = model, per_image
        self.class_weight, self.gen = class_weight, generator
        self.targets: Tensor | None = None     # per batch: drawn at its first call, then kept
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                    and m.track_running_stats and m.running_mean is not None]
        if not self.bns:
            raise QuantkitError(f"{type(model).__name__} has no BatchNorm2d with running "
                                "statistics: data-free calibration (zeroq, genie) needs them; "
                                "pass real images (--calib imagefolder:PATH)")
        self.terms: list[Tensor] = []

    def _hook(self, bn: nn.BatchNorm2d, args) -> None:
        self.terms.append(stat_loss(args[0], bn.running_mean, (bn.running_var + EPS).sqrt(),
                                    self.per_image))

    def __call__(self, x: Tensor) -> Tensor:
        handles = [bn.register_forward_pre_hook(self._hook) for bn in self.bns]
        self.terms = []
        try:
            out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        prior = stat_loss(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), self.per_image)
        loss = torch.stack(self.terms).sum() + prior
        if self.class_weight:                 # each image toward its own random class
            logits = (out.logits if hasattr(out, "logits") else out).flatten(1)
            if self.targets is None:
                self.targets = torch.randint(logits.shape[1], (len(x),), generator=self.gen)
            loss = loss + self.class_weight * F.cross_entropy(logits, self.targets)
        return loss


def swing(x: Tensor, dy: int, dx: int) -> Tensor:
    """Reflect-pad by one pixel and crop back to the original size shifted by (dy, dx) in
    {-1, 0, 1}²; (0, 0) returns x unchanged."""
    if not (abs(dy) <= 1 and abs(dx) <= 1):
        raise ValueError("swing offsets are -1, 0 or 1")
    h, w = x.shape[-2:]
    if min(h, w) < 2:                        # reflect padding needs two pixels
        return x
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


class SwingConvs:
    """While active, every conv with stride > 1 sees its input randomly swung (Genie-D): the
    distilled images do not learn the aliasing of one fixed subsampling grid."""

    def __init__(self, model: nn.Module, generator: torch.Generator):
        self.convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
        self.gen, self.handles = generator, []

    def _hook(self, _m, args):
        dy, dx = (torch.randint(-1, 2, (2,), generator=self.gen)).tolist()
        return (swing(args[0], dy, dx),) + args[1:]

    def __enter__(self) -> "SwingConvs":
        self.handles = [c.register_forward_pre_hook(self._hook) for c in self.convs]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class Frozen:
    """Eval mode and no parameter gradients for the model while distilling into its inputs."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.grads:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)
        for p, flag in self.grads:
            p.requires_grad_(flag)


def optimise_batches(model: nn.Module, n: int, batch_size: int, iterations: int, per_image: bool,
                     make, desc: str, progress: bool = True, history: list | None = None,
                     context=contextlib.nullcontext, class_weight: float = 0.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """The distillation loop both methods share: per batch of b images, `make(b)` gives
    (produce() -> images, optimisers, plateau schedulers (stepped on the loss), step
    schedulers); `iterations` steps on the BN-statistics loss, inside `context()`. history
    gets (first, last) loss per batch. class_weight > 0 adds that times the cross-entropy of
    each image toward a class drawn at random (from `generator`) per image."""
    loss_fn = BNStatLoss(model, per_image, class_weight, generator)
    out = []
    bar = tqdm(total=-(-n // batch_size) * iterations, desc=desc, disable=not progress)
    with Frozen(model), bar:
        for start in range(0, n, batch_size):
            produce, opts, plateau, steps = make(min(batch_size, n - start))
            loss_fn.targets = None
            first = None
            with context():
                for _ in range(iterations):
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    loss = loss_fn(produce())
                    loss.backward()
                    for o in opts:
                        o.step()
                    for s in plateau:
                        s.step(loss.item())
                    for s in steps:
                        s.step()
                    first = loss.item() if first is None else first
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            with torch.no_grad():
                x = produce().detach()
                if history is not None:
                    history.append((first, float(loss_fn(x))))
            out.append(x)
    return torch.cat(out)
