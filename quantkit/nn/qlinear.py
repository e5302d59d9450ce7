"""QuantLinear: a drop-in for nn.Linear that holds a PackedLinear and runs a chosen kernel."""
from __future__ import annotations

from torch import Tensor, nn

from quantkit.formats.packed import PackedLinear
from quantkit.kernels import select


class QuantLinear(nn.Module):
    """Packed tensors are buffers (so .to() and state_dict work); the kernel is prepared lazily."""

    def __init__(self, packed: PackedLinear, bias: Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        self.format, self.meta = packed.format, dict(packed.meta)
        self.out_features, self.in_features = packed.shape
        self._names = tuple(packed.tensors)
        for k, t in packed.tensors.items():
            self.register_buffer(k, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = kernel
        self._forward = None
        self._prepared_for = None

    @property
    def packed(self) -> PackedLinear:
        return PackedLinear(self.format, (self.out_features, self.in_features),
                            {k: getattr(self, k) for k in self._names}, self.meta)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (for code that inspects .weight; not used by forward)."""
        return self.packed.dequantize()

    def kernel_name(self, device_type: str = "cpu") -> str:
        return select(self.packed, device_type, self.kernel).name

    def forward(self, x: Tensor) -> Tensor:
        key = (x.device.type, self.kernel)
        if self._prepared_for != key:
            k = select(self.packed, x.device.type, self.kernel)
            self._forward = k.prepare(self.packed, self.bias)
            self._prepared_for = key
        return self._forward(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format}, {self.meta}"

    def _apply(self, fn, recurse=True):
        self._prepared_for = None  # device or dtype moved: prepare again
        return super()._apply(fn, recurse)


def replace_linear(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
