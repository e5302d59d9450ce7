"""N:M semi-structured masks: keep n of every m consecutive weights along the input dimension."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.sparse import is_nm  # noqa: F401  (the format checks it; re-exported)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), with a clear error for anything else."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise QuantkitError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise QuantkitError(f"--pattern {pattern!r}: need 0 < N < M")
    return n, m


def check_width(in_features: int, m: int, name: str = "layer") -> None:
    if in_features % m:
        raise QuantkitError(f"{name}: {in_features} input features is not a multiple of {m}; "
                            "an N:M pattern needs whole groups (leave this layer dense)")


def nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Bool mask [out, in] keeping the n highest scores of every m consecutive input columns."""
    out_f, in_f = scores.shape
    check_width(in_f, m)
    groups = scores.reshape(out_f, in_f // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)
