"""Calibration text: n windows of seqlen tokens drawn with a seed from a corpus's calibration part."""
from __future__ import annotations

import torch
from torch import Tensor

from evals.data import load_text
from quantkit.errors import QuantkitError


def calibration_batches(tokenizer, dataset: str, n_samples: int, seqlen: int, seed: int,
                        batch_size: int = 8) -> list[Tensor]:
    """Random windows [n, seqlen] of the calibration split, split into batches."""
    ids = tokenizer(load_text(dataset, "calib"), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise QuantkitError(f"calibration text {dataset!r} has {ids.numel()} tokens, "
                            f"fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    windows = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
    return list(windows.split(batch_size))
