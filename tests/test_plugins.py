"""A method is a plug-in: registering it in its own module is all the pipeline needs."""
from dataclasses import asdict, dataclass

import pytest
import torch

import quantkit
import quantkit.pipeline  # noqa: F401  (every method registered before the registry is copied)
from quantkit import registry
from quantkit.errors import QuantkitError
from quantkit.formats.packed import make_int
from quantkit.quant.rtn import rtn_codes
from tests.conftest import tiny_model

SMALL = {"calib.n_samples": 4, "calib.seqlen": 16, "group_size": 32}


@dataclass
class HalfConfig:
    scale: float = 1.0


def test_a_new_method_needs_only_its_registration(monkeypatch):
    """A toy compressor (RTN of W * scale) with its own recipe section, options hook and
    prepare hook runs through the pipeline; its section is validated before anything runs."""
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    monkeypatch.setattr(registry, "_HOOKS", dict(registry._HOOKS))
    seen = {}

    def prepare(model, recipe):
        seen["prepared"] = type(model).__name__

    @registry.register("compressor", "toy", section="toy", config=HalfConfig, prepare=prepare,
                       options=lambda r: asdict(r.section("toy", HalfConfig)))
    def toy(W, stats, spec, scale):
        seen.setdefault("scales", set()).add(scale)
        codes, s, z = rtn_codes(W * scale, spec)
        return make_int(codes, s, z, spec.bits, spec.group_size)
    toy.needs_stats = False

    model = tiny_model("llama")
    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    rep = quantkit.quantize(model, method="toy", bits=4, progress=False, **SMALL, **{"toy.scale": 0.5})
    assert seen == {"prepared": "LlamaForCausalLM", "scales": {0.5}}
    codes, s, z = rtn_codes(W * 0.5, quantkit.QSpec(bits=4, group_size=32, mse=False))
    assert torch.equal(rep.packed["model.layers.0.mlp.down_proj"].dequantize(),
                       make_int(codes, s, z, 4, 32).dequantize())
    with pytest.raises(QuantkitError, match="recipe.toy: unknown field"):
        quantkit.quantize(tiny_model("llama"), method="toy", **{"toy.scael": 2.0})
    assert seen["scales"] == {0.5}                     # the bad run never reached the compressor
