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


def _windows(tokenizer, name: str, n: int, seqlen: int, seed: int) -> Tensor:
    ids = tokenizer(load_text(name, "calib"), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise QuantkitError(f"calibration text {name!r} has {ids.numel()} tokens, "
                            f"fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
