"""QuantLinear: a drop-in for nn.Linear that holds a PackedLinear and runs a chosen kernel."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.kernels import select
from quantkit.quant.rotation import OnlineHadamard


class QuantLinear(nn.Module):
    """Packed tensors are buffers (so .to() and state_dict work); the kernel is prepared on first use.

    For serving, `prepare(device, release=True)` drops the packed buffers once a kernel holds its
    own copy of them (CPU int4/int8, Triton), so the layer is resident once, not twice; such a
    layer still runs, but can no longer move device, dequantize or be saved.
    """

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
        self._released = False
        # an online Hadamard (RSQ) multiplies the input before the stored weight does
        had = self.meta.get("input_hadamard")
        self._input_transform = None if had is None else OnlineHadamard(*had)

    def _check_packed(self, what: str) -> None:
        if self._released:
            raise QuantkitError(f"cannot {what}: this layer's packed tensors were released after preparing "
                                f"its {self._prepared_for[1]} kernel on {self._prepared_for[0]}; load with "
                                "quantkit.load(..., keep_packed=True) to move, inspect or save the model")

    @property
    def packed(self) -> PackedLinear:
        self._check_packed("read the packed weight")
        return PackedLinear(self.format, (self.out_features, self.in_features),
                            {k: getattr(self, k) for k in self._names}, self.meta)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (for code that inspects .weight; not used by forward)."""
        return self.packed.dequantize()

    def kernel_name(self, device_type: str = "cpu") -> str:
        if self._released:
            return self._prepared_for[1]
        return select(self.packed, device_type, self.kernel).name

    def prepare(self, device_type: str, release: bool = False) -> None:
        """Build the kernel's own layout for this device now (forward does it on first use)."""
        if self._prepared_for is None or self._prepared_for[0] != device_type:
            self._check_packed(f"prepare a kernel for {device_type}")
            k = select(self.packed, device_type, self.kernel)
            self._forward = k.prepare(self.packed, self.bias)
            self._prepared_for = (device_type, k.name)
            if release and k.standalone:
                for name in self._names:
                    del self._buffers[name]
                self._released = True

    def forward(self, x: Tensor) -> Tensor:
        self.prepare(x.device.type)
        if self._input_transform is not None:
            x = self._input_transform(x)
        return self._forward(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format}, {self.meta}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._check_packed("save it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        """Moves follow the model; dtype casts skip the packed tensors (fp16 scales stay exact)."""
        old = self.bias.device if self.bias is not None else (
            getattr(self, self._names[0]).device if not self._released else torch.device(self._prepared_for[0]))
        target = fn(torch.empty(0, device=old)).device
        if target != old:
            self._check_packed(f"move it to {target}")
            self._prepared_for = None  # prepare again on the new device
        packed = {} if self._released else {k: getattr(self, k) for k in self._names}
        super()._apply(fn, recurse)
        for k, t in packed.items():
            setattr(self, k, t.to(target))
        return self


def replace_linear(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
