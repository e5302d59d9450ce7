"""Image data for the CNN evals, without torchvision.

  fashion-mnist  labelled 28x28 grayscale (Debian `dataset-fashion-mnist`), train/test splits
  photos         unlabelled random crops of the real colour photographs shipped inside the
                 scikit-image wheel (plus /usr/share/backgrounds/ if present)
  imagefolder    any local folder of images; class subfolders give labels
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quantkit.errors import QuantkitError

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FMNIST_FETCH = ("apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x"
                " && mkdir -p {dest} && cp x/usr/share/datasets/fashion-mnist/*.gz {dest}/")
# Colour photographs of natural scenes in skimage/data (checked in scikit-image 0.26: all RGB,
# shorter side >= 300 px, present in the wheel itself, not behind pooch downloads). Left out:
# grayscale files, synthetic ones (color, phantom, chessboard, logo, horse) and the
# microscopy / fundus images (ihc, retina), which are far from ImageNet-like scenes.
# motorcycle_left/right are a stereo pair: two files, one scene.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                  "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg")
BACKGROUNDS = Path("/usr/share/backgrounds")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SKIMAGE_PIP = "pip install --no-deps scikit-image"
DATASETS = ("fashion-mnist", "photos", "imagefolder:PATH")


# ---------------------------------------------------------------- Fashion-MNIST

def _fmnist_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FMNIST_FILES.values() for f in pair)


def _fetch_fmnist(dest: Path) -> None:
    """Download the Debian package once and copy its four .gz files into dest atomically."""
    hint = FMNIST_FETCH.format(dest=dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fmnist-", dir=dest.parent) as tmp:
        work = Path(tmp)
        try:
            subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=work, check=True,
                           capture_output=True, timeout=600)
            deb = next(work.glob("dataset-fashion-mnist_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True,
                           capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            raise QuantkitError(f"could not fetch Fashion-MNIST ({type(e).__name__}): run `{hint}`")
        out = work / "out"
        out.mkdir()
        for pair in FMNIST_FILES.values():
            for name in pair:
                src = work / "x" / FMNIST_SYSTEM.relative_to("/") / name
                if not src.is_file():
                    raise QuantkitError(f"the Debian package lacks {name}: run `{hint}`")
                shutil.copy2(src, out / name)
        try:
            os.replace(out, dest)
        except OSError:
            # Another process won the race (or left a partial folder): accept only a full one.
            if not _fmnist_complete(dest):
                raise QuantkitError(f"incomplete Fashion-MNIST folder {dest}: remove it and run `{hint}`")


def _fmnist_dir() -> Path:
    if _fmnist_complete(FMNIST_SYSTEM):
        return FMNIST_SYSTEM
    from quantkit.model.zoo import cache_dir
    cached = cache_dir() / "data" / "fashion-mnist"
    if not _fmnist_complete(cached):
        _fetch_fmnist(cached)
    return cached


def _read_idx(path: Path) -> np.ndarray:
    """Decode one idx file (big-endian dims after a magic with the unsigned-byte type 0x08)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise QuantkitError(f"{path} is not an unsigned-byte idx file: delete it and run the fetch again")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=2)
def _fmnist_cached(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = _fmnist_dir()
    images_file, labels_file = FMNIST_FILES[split]
    images = torch.from_numpy(_read_idx(folder / images_file).copy())
    labels = torch.from_numpy(_read_idx(folder / labels_file).astype(np.int64))
    return images, labels


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images uint8 [N,28,28] and labels int64 [N] for split "train" or "test"."""
    if split not in FMNIST_FILES:
        raise QuantkitError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    images, labels = _fmnist_cached(split)
    # Clones: callers may modify in place without corrupting the in-memory cache.
    return images.clone(), labels.clone()


# ---------------------------------------------------------------- photos

def _skimage_data_dir() -> Path | None:
    # find_spec does not import skimage (its import is slow and pulls optional dependencies).
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def photo_files() -> list[Path]:
    """The real photographs that photos() crops from, in a fixed order."""
    files: list[Path] = []
    data = _skimage_data_dir()
    if data is not None:
        files += [data / name for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    if BACKGROUNDS.is_dir():
        files += sorted(p for p in BACKGROUNDS.rglob("*")
                        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise QuantkitError(f"no photographs found (scikit-image missing): run `{SKIMAGE_PIP}`")
    return files


@functools.lru_cache(maxsize=1)
def _photo_images() -> tuple[Image.Image, ...]:
    images = []
    for path in photo_files():
        im = _open_rgb(path)
        # Desktop backgrounds can be 4K+; halving keeps crops sharp and memory small.
        while min(im.size) >= 2048:
            im = im.reduce(2)
        images.append(im)
    return tuple(images)


def _random_crop(im: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    w, h = im.size
    side = rng.uniform(0.3, 1.0) * min(w, h)
    aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    cw = int(min(w, max(1, round(side * np.sqrt(aspect)))))
    ch = int(min(h, max(1, round(side / np.sqrt(aspect)))))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    arr = np.asarray(crop, dtype=np.uint8)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr.transpose(2, 0, 1)


def photos(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """n random crops (uint8 [n,3,size,size]) of real photographs, deterministic for a seed."""
    if n < 0 or size < 1:
        raise QuantkitError(f"photos needs n >= 0 and size >= 1, got n={n}, size={size}")
    images = _photo_images()
    rng = np.random.default_rng(seed)
    # Cycle through shuffled passes so every photograph is used equally often.
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-n // len(images)))] or [[]])
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        out[i] = _random_crop(images[int(order[i])], rng, size)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- image folders

def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise QuantkitError(f"cannot read image {path} ({type(e).__name__}): replace or delete the file")


def _resize_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """Shorter side to round(size/0.875), then the central size x size window (ImageNet eval)."""
    short = round(size / 0.875)
    w, h = im.size
    if min(w, h) != short:
        scale = short / min(w, h)
        w, h = (short, max(short, round(h * scale))) if w <= h else (max(short, round(w * scale)), short)
        im = im.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr.transpose(2, 0, 1)


def _image_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                  key=lambda p: p.relative_to(root).as_posix())


def imagefolder(path: str, size: int = 224) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every image under path as RGB uint8 [n,3,size,size]; labels from class subfolders or None."""
    root = Path(path)
    if not root.exists():
        raise QuantkitError(f"image folder {path} does not exist: pass an existing directory")
    if not root.is_dir():
        raise QuantkitError(f"image folder {path} is not a directory: pass the folder that holds the images")
    files = _image_files(root)
    if not files:
        raise QuantkitError(f"no image files ({', '.join(IMAGE_EXTS)}) under {path}: "
                            "put images there or pass another folder")
    x = torch.from_numpy(np.stack([_resize_center_crop(_open_rgb(f), size) for f in files]))
    # Labels only when every image sits inside a first-level subfolder (path/<class>/...).
    rel = [f.relative_to(root).parts for f in files]
    if any(len(parts) < 2 for parts in rel):
        return x, None
    classes = sorted({parts[0] for parts in rel})
    index = {name: i for i, name in enumerate(classes)}
    return x, torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64)


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """'imagefolder:PATH' -> ('imagefolder', PATH); 'fashion-mnist'/'photos' -> (name, None)."""
    if spec in ("fashion-mnist", "photos"):
        return spec, None
    if spec.startswith("imagefolder:") and spec[len("imagefolder:"):]:
        return "imagefolder", spec[len("imagefolder:"):]
    raise QuantkitError(f"unknown image dataset {spec!r}: use one of {', '.join(DATASETS)}")
