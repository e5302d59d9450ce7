"""Calibration text: n windows of seqlen tokens drawn with a seed from the calibration parts of
one corpus or of several (an equal share of windows from each)."""
from __future__ import annotations

import torch
from torch import Tensor

from evals.data import domains, load_text
from quantkit.errors import QuantkitError


def calibration_batches(tokenizer, dataset: str, n_samples: int, seqlen: int, seed: int,
                        batch_size: int = 8) -> list[Tensor]:
    """Random windows [n, seqlen] of the calibration split, split into batches.

    A composite dataset (`mix`, `a,b,c`) gives each corpus n // k windows (the first n % k
    corpora one more), drawn inside that corpus, and interleaves them so that every batch,
    and the first windows the cost table uses, mix the domains.
    """
    names = domains(dataset)
    per = [n_samples // len(names) + (i < n_samples % len(names)) for i in range(len(names))]
    drawn = [_windows(tokenizer, name, k, seqlen, seed) for name, k in zip(names, per) if k]
    rows = [w for j in range(max(per)) for w in (d[j] for d in drawn if j < len(d))]
    return list(torch.stack(rows).split(batch_size))


def user_calibration(tokenizer, calib, n_samples: int, seqlen: int, seed: int,
                     batch_size: int = 8) -> list[Tensor]:
    """Batches from calibration the caller passed: token ids [n, L] (or a list of such
    tensors, or of 1-D ones of one length) used as they are, or text (a string or a list of
    them, joined by blank lines) from which n_samples windows of seqlen tokens are drawn."""
    if isinstance(calib, str) or (isinstance(calib, (list, tuple)) and calib
                                  and all(isinstance(t, str) for t in calib)):
        if tokenizer is None:
            raise QuantkitError("calibration text needs a tokenizer: pass tokenizer=... "
                                "or token ids [n, seqlen]")
        text = calib if isinstance(calib, str) else "\n\n".join(calib)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        return list(_draw(ids, "the calibration text", n_samples, seqlen, seed).split(batch_size))
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(t, Tensor) for t in calib):
        try:
            calib = torch.cat([t.reshape(-1, t.shape[-1]) for t in calib])
        except RuntimeError as e:
            raise QuantkitError(f"calibration tensors of different lengths: {e}") from e
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.is_floating_point() or not calib.numel():
        raise QuantkitError("calib: pass text (a string or a list of strings) or token ids as an "
                            f"integer tensor [n, seqlen]; got {_describe(calib)}")
    return list(calib.long().split(batch_size))


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}" + (" (empty)" if isinstance(x, (list, tuple)) and not x else "")


def _windows(tokenizer, name: str, n: int, seqlen: int, seed: int) -> Tensor:
    ids = tokenizer(load_text(name, "calib"), return_tensors="pt").input_ids[0]
    return _draw(ids, f"calibration text {name!r}", n, seqlen, seed)


def _draw(ids: Tensor, what: str, n: int, seqlen: int, seed: int) -> Tensor:
    """n windows of seqlen tokens at seeded random starts."""
    if ids.numel() <= seqlen:
        raise QuantkitError(f"{what} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
