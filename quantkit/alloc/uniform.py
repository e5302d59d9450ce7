"""The baseline allocator: every layer gets the same spec."""
from __future__ import annotations

from quantkit.quant.base import QSpec
from quantkit.registry import register


@register("allocator", "uniform")
def uniform(layers: list[str], spec: QSpec) -> dict[str, QSpec]:
    """Every layer quantized with `spec`."""
    return {name: spec for name in layers}
