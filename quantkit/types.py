"""The types every layer of quantkit shares: what a compressor sees of a layer (LayerStats), how
it quantizes one (QSpec), the supported widths, and the Compressor / Allocator call shapes.
This module imports nothing else from quantkit, so that anything may import it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class LayerStats:
    """What a compressor may know about one linear layer's inputs."""
    H: Tensor                       # [in, in] mean of x xᵀ over tokens (fp32)
    n: int                          # tokens seen
    act_absmax: Tensor | None = None
    cross: Tensor | None = None     # [in, in] mean of x_fp xᵀ: inputs of the unquantized model


@dataclass(frozen=True)
class QSpec:
    """How to quantize one layer. group_size -1 means one group per output row."""
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True      # with act-order: groups fixed on the original column order
    mse: bool = True                # shrink-search the grid range instead of plain min-max
    damp: float = 0.01              # GPTQ: fraction of mean(diag H) added to the diagonal

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")


class Compressor(Protocol):
    """W [out, in] (fp32), the layer's statistics (None for data-free methods), its QSpec ->
    a PackedLinear (formats/). Optional attributes: needs_stats (bool), storage_floor(out, in,
    spec) -> bits (when its format is not the plain integer one)."""
    def __call__(self, W: Tensor, stats: LayerStats | None, spec: QSpec) -> Any: ...


class Allocator(Protocol):
    """A CostTable (alloc/table.py) and an average budget in bits per weight -> the option
    index of every layer [L]."""
    def __call__(self, table: Any, bits_per_weight: float) -> Tensor: ...
