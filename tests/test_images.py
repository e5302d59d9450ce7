"""Image folders, dataset specs and classification metrics: all offline, nothing downloaded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from evals.classify import agreement, logits, topk_accuracy
from evals.images import imagefolder, parse_dataset
from quantkit.errors import QuantkitError


def _gradient(w: int, h: int) -> np.ndarray:
    """RGB image whose channels encode x, y and x+y, so any shift or flip changes the numbers."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)


def _save(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------- imagefolder

def test_imagefolder_crop_without_resize_is_exact_center(tmp_path):
    # Shorter side already round(224 / 0.875) = 256: the result is a pure center slice.
    arr = _gradient(300, 256)
    _save(tmp_path / "a.png", arr)
    x, labels = imagefolder(str(tmp_path))
    assert labels is None
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 224, 224)
    expected = arr[16:240, 38:262].transpose(2, 0, 1)
    assert np.array_equal(x[0].numpy(), expected)


def test_imagefolder_resize_then_crop_matches_reference(tmp_path):
    arr = _gradient(120, 90)        # landscape: height is the shorter side
    _save(tmp_path / "g.png", arr)
    size = 56
    x, _ = imagefolder(str(tmp_path), size=size)
    short = round(size / 0.875)                       # 64
    new_w = round(120 * short / 90)                   # 85
    ref = np.asarray(Image.fromarray(arr).resize((new_w, short), Image.BILINEAR))
    left, top = round((new_w - size) / 2), round((short - size) / 2)
    expected = ref[top:top + size, left:left + size].transpose(2, 0, 1)
    assert x.shape == (1, 3, size, size)
    assert np.array_equal(x[0].numpy(), expected)


def test_imagefolder_portrait_and_grayscale_become_rgb(tmp_path):
    _save(tmp_path / "p.png", _gradient(40, 100))
    Image.fromarray(np.full((50, 70), 200, np.uint8)).save(tmp_path / "q.bmp")
    x, _ = imagefolder(str(tmp_path), size=32)
    assert x.shape == (2, 3, 32, 32)
    assert bool((x[1] == 200).all())


def test_imagefolder_sorted_and_extensions_case_insensitive(tmp_path):
    for name, value in (("b.PNG", 20), ("a.jpeg", 10), ("c.webp", 30)):
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(tmp_path / name,
                                                                   quality=100, lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    x, labels = imagefolder(str(tmp_path), size=16)
    assert labels is None and len(x) == 3
    assert [int(v) for v in x[:, 0, 8, 8]] == [10, 20, 30]


def test_imagefolder_class_subfolders_give_sorted_labels(tmp_path):
    for cls, names in (("dog", ("1.png", "2.png")), ("cat", ("9.png",)), ("emu", ("0.png",))):
        for name in names:
            _save(tmp_path / cls / name, _gradient(32, 32))
    x, labels = imagefolder(str(tmp_path), size=16)
    assert x.shape == (4, 3, 16, 16)
    # files sorted: cat/9, dog/1, dog/2, emu/0 ; classes sorted: cat=0, dog=1, emu=2
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 1, 2]


def test_imagefolder_mixed_layout_has_no_labels(tmp_path):
    _save(tmp_path / "top.png", _gradient(32, 32))
    _save(tmp_path / "cls" / "x.png", _gradient(32, 32))
    _, labels = imagefolder(str(tmp_path), size=16)
    assert labels is None


def test_imagefolder_errors(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        imagefolder(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(QuantkitError, match="not a directory"):
        imagefolder(str(tmp_path / "file.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(QuantkitError, match=r"no image files \(\.jpg, \.jpeg, \.png, \.bmp, \.webp\)"):
        imagefolder(str(empty))
    bad = tmp_path / "bad"
    _save(bad / "ok.png", _gradient(32, 32))
    (bad / "broken.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(QuantkitError, match=r"cannot read image .*broken\.jpg"):
        imagefolder(str(bad))


def test_errors_are_one_line(tmp_path):
    with pytest.raises(QuantkitError) as e:
        imagefolder(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- parse_dataset

def test_parse_dataset():
    assert parse_dataset("fashion-mnist") == ("fashion-mnist", None)
    assert parse_dataset("photos") == ("photos", None)
    assert parse_dataset("imagefolder:/data/val") == ("imagefolder", "/data/val")
    assert parse_dataset("imagefolder:C:/x:y") == ("imagefolder", "C:/x:y")
    for bad in ("imagenet", "imagefolder:", "Photos", ""):
        with pytest.raises(QuantkitError, match="fashion-mnist, photos, imagefolder:PATH"):
            parse_dataset(bad)


# ---------------------------------------------------------------- metrics

def test_topk_accuracy_hand_computed():
    lg = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6],     # ranking 6,5,4,3,2,1,0
                       [6.0, 5, 4, 3, 2, 1, 0],     # ranking 0,1,2,3,4,5,6
                       [0.0, 0, 9, 0, 0, 0, 1],
                       [1.0, 2, 3, 4, 5, 6, 7]])
    labels = torch.tensor([6, 4, 6, 1])
    # row0: top1 hit; row1: label 4 is 5th -> top5 hit only; row2: 6 is 2nd -> top5;
    # row3: label 1 is 6th -> miss both.
    acc = topk_accuracy(lg, labels)
    assert acc == {"top1": 0.25, "top5": 0.75}
    assert topk_accuracy(lg, labels, ks=(1, 2, 6)) == {"top1": 0.25, "top2": 0.5, "top6": 1.0}


def test_topk_accuracy_fewer_than_five_classes():
    lg = torch.tensor([[3.0, 2, 1], [1.0, 2, 3]])
    acc = topk_accuracy(lg, torch.tensor([2, 0]))
    assert acc == {"top1": 0.0, "top5": 1.0}


def test_topk_accuracy_shape_mismatch():
    with pytest.raises(QuantkitError, match="do not match"):
        topk_accuracy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def _kl_by_formula(p_logits: list[float], q_logits: list[float]) -> float:
    zp = sum(math.exp(v) for v in p_logits)
    zq = sum(math.exp(v) for v in q_logits)
    p = [math.exp(v) / zp for v in p_logits]
    q = [math.exp(v) / zq for v in q_logits]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_agreement_hand_computed():
    fp = torch.tensor([[5.0, 1, 0, 0, 0, 0],
                       [0.0, 4, 1, 0, 0, 0],
                       [0.0, 0, 0, 0, 0, 3]])
    q = torch.tensor([[5.0, 1, 0, 0, 0, 0],          # same argmax
                      [4.0, 3, 2, 1, 0.5, -1],       # fp's class 1 is q's 2nd
                      [5.0, 4, 3, 2, 1, 0]])         # fp's class 5 is q's 6th: outside top-5
    out = agreement(q, fp)
    assert out["agreement_top1"] == pytest.approx(1 / 3)
    assert out["agreement_top5"] == pytest.approx(2 / 3)
    expected = sum(_kl_by_formula(a.tolist(), b.tolist()) for a, b in zip(fp, q)) / 3
    assert out["kl"] == pytest.approx(expected, rel=1e-9)
    # KL(p_fp || p_q) is not symmetric: swapping the arguments must change it.
    assert agreement(fp, q)["kl"] != pytest.approx(expected, rel=1e-3)


def test_agreement_identical_is_perfect():
    lg = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    out = agreement(lg.clone(), lg)
    assert out["agreement_top1"] == 1.0 and out["agreement_top5"] == 1.0
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)


def test_agreement_shape_mismatch():
    with pytest.raises(QuantkitError, match="shapes differ"):
        agreement(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- logits()

def _tiny_resnet():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=7)
    return tf.ResNetForImageClassification(cfg)


def test_logits_hf_model_batches_and_restores_mode():
    model = _tiny_resnet().train()
    x = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    calls = []

    def prep(chunk):
        calls.append(len(chunk))
        return chunk[:, None].float() / 255

    out = logits(model, x, prep, batch_size=4)
    assert calls == [4, 4, 2]
    assert out.dtype == torch.float32 and out.shape == (10, 7)
    assert model.training                        # caller's mode is restored
    model.eval()
    with torch.no_grad():
        ref = model(x[:, None].float() / 255).logits
    assert torch.allclose(out, ref, atol=1e-5)
    assert not out.requires_grad


def test_logits_plain_tensor_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    x = torch.arange(8.0).reshape(2, 4)
    out = logits(model, x, lambda t: t.double())
    assert out.dtype == torch.float32
    assert torch.allclose(out, model(x.double()).float())
    with pytest.raises(QuantkitError, match="no inputs"):
        logits(model, x[:0], lambda t: t)
