"""transformers integration: checkpoints with `quant_method: "quantkit"` load with from_pretrained.

`import quantkit` registers the config and quantizer through transformers' public hooks. The
model skeleton is built on the meta device, its linears are swapped for QuantLinear modules
whose buffers have the packed tensors' shapes (read from the safetensors header), and
transformers then loads the packed tensors straight into them: no dense copy is ever made.
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                                          register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.errors import QuantkitError
from quantkit.formats.io import QUANT_METHOD, SAFETENSORS_DTYPES

class QuantkitConfig(QuantizationConfigMixin):
    """The checkpoint manifest (per-layer format, shape, metadata) as a transformers config."""

    def __init__(self, layers: dict | None = None, kernel: str = "auto", **extra):
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        self.kernel = kernel
        for k, v in extra.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        d = {k: v for k, v in super().to_dict().items() if k != "kernel"}
        return d


class QuantkitHfQuantizer(HfQuantizer):
    """Pre-quantized loading only: QuantLinear modules are installed before the weights load."""
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from quantkit.serve import install_quant_linears
        if not checkpoint_files:
            raise QuantkitError("quantkit checkpoints load from local safetensors files")
        meta = {}
        for f in checkpoint_files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    meta[k] = torch.empty(sl.get_shape(), dtype=SAFETENSORS_DTYPES[sl.get_dtype()], device="meta")
        manifest = self.quantization_config.to_dict()
        install_quant_linears(model, manifest, meta, self.quantization_config.kernel)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # the tensors are already packed; they load as they are

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer once (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantkitConfig)
        register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)
