"""Kernel choice in one table: (format, device type) -> kernels in order of preference.

A kernel is `prepare(packed, bias) -> forward(x)` plus `supports(packed) -> bool`; a
`standalone` kernel keeps its own copy of the weight, so the packed tensors may be dropped.
Algorithm code never imports this package; only nn/ does.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.kernels import cpu, llm_int8, lut, reference, sparse, triton

Forward = Callable[[Tensor], Tensor]


class Kernel(NamedTuple):
    name: str
    supports: Callable[[PackedLinear], bool]
    prepare: Callable[[PackedLinear, Tensor | None], Forward]
    standalone: bool = True


KERNELS = {k.name: k for k in (
    Kernel("reference", lambda p: True, reference.prepare, standalone=False),
    Kernel("cpu_int4", cpu.supports_int4, cpu.prepare_int4),
    Kernel("cpu_int8", cpu.supports_int8, cpu.prepare_int8),
    Kernel("triton", triton.supports, triton.prepare),
    Kernel("llm_int8_emulated", llm_int8.supports, llm_int8.prepare_emulated, standalone=False),
    Kernel("cpu_llm_int8", llm_int8.supports, llm_int8.prepare_cpu, standalone=False),
    Kernel("bnb_int8", llm_int8.supports_bnb, llm_int8.prepare_bnb, standalone=False),
    Kernel("cpu_lut", lut.supports, lut.prepare),
    Kernel("cpu_sparse", sparse.supports_cpu, sparse.prepare_cpu),
    Kernel("cuda_sparse", sparse.supports_cuda, sparse.prepare_cuda),
)}

TABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("int", "cpu"): ("cpu_int4", "cpu_int8", "reference"),
    ("int", "cuda"): ("triton", "reference"),
    ("llm-int8", "cpu"): ("cpu_llm_int8",),
    ("lut", "cpu"): ("cpu_lut", "reference"),
    ("llm-int8", "cuda"): ("bnb_int8", "llm_int8_emulated"),
    ("sparse", "cpu"): ("cpu_sparse", "reference"),
    ("sparse", "cuda"): ("cuda_sparse", "reference"),
}

_warned: set[tuple[str, str]] = set()


def select(packed: PackedLinear, device_type: str, kernel: str = "auto") -> Kernel:
    """The first kernel in the table that supports this layer (or the one forced by name)."""
    if kernel != "auto":
        if kernel not in KERNELS:
            raise QuantkitError(f"unknown kernel {kernel!r}; choose one of: auto, {', '.join(KERNELS)}")
        if not KERNELS[kernel].supports(packed):
            raise QuantkitError(f"kernel {kernel!r} does not support {packed.format} {packed.meta}")
        return KERNELS[kernel]
    for name in TABLE.get((packed.format, device_type), ("reference",)):
        if KERNELS[name].supports(packed):
            if name == "reference" and device_type == "cpu":
                key = (packed.format, str(sorted(packed.meta.items())))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"no fast CPU kernel for {packed.format} {packed.meta}; "
                                  "using the reference kernel (dequantize + matmul)")
            return KERNELS[name]
    return KERNELS["reference"]
