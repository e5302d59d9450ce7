"""Loading for serving: from_pretrained after `import quantkit` equals quantkit.load."""
import pytest
import torch

import quantkit
from quantkit.formats.io import atomic_dir, save_packed
from quantkit.pipeline import compress_model
from quantkit.quant.base import QSpec
from quantkit.quant.gptq import gptq
from tests.conftest import tiny_model, token_batches
from tests.test_models import outputs, plan_for


def save_quantized(family, path, mixed=False, edit=None, **spec_kw):
    """A tiny model quantized with GPTQ (4 bits g32 unless spec_kw says otherwise, or 4/8 mixed
    layer by layer) saved to path; `edit(model)` may change the weights first."""
    model = tiny_model(family)
    if edit:
        edit(model)
    spec_kw = {"bits": 4, "group_size": 32, **spec_kw}
    plan = plan_for(model, QSpec(**spec_kw))
    if mixed:
        plan = {n: QSpec(**{**spec_kw, "bits": 8 if i % 3 == 0 else 4})
                for i, (n, _) in enumerate(plan.items())}
    packed, _ = compress_model(model, token_batches(), plan, gptq, torch.device("cpu"), progress=False)
    with atomic_dir(path) as d:
        save_packed(d, model, packed, {})
    return model


@pytest.mark.parametrize("family, mixed, act_order", [("llama", False, True), ("llama", True, False),
                                                      ("gpt2", True, True)])
def test_from_pretrained_equals_quantkit_load(family, mixed, act_order, tmp_path):
    from transformers import AutoModelForCausalLM
    save_quantized(family, tmp_path / "q", mixed, act_order=act_order, static_groups=not act_order)
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    ours = quantkit.load(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(type(theirs.get_submodule(n)).__name__ == "QuantLinear"
               for n in theirs.config.quantization_config.layers)
    assert not any(t.is_meta for t in theirs.state_dict().values())
    assert torch.equal(outputs(ours, ids), outputs(theirs, ids))
    oracle = outputs(quantkit.load(tmp_path / "q", kernel="reference"), ids)
    assert (outputs(theirs, ids) - oracle).norm() / oracle.norm() < 1e-2
    theirs.save_pretrained(tmp_path / "again")       # and saves back to a checkpoint we read
    assert torch.equal(outputs(quantkit.load(tmp_path / "again"), ids), outputs(ours, ids))
    ours16 = quantkit.load(tmp_path / "q", dtype=torch.bfloat16, keep_packed=True)
    theirs16 = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    layer = next(iter(theirs.config.quantization_config.layers))
    for m in (ours16, theirs16):                     # a dtype cast never touches packed tensors
        assert m.get_submodule(layer).scales.dtype == torch.float16
        assert torch.equal(m.get_submodule(layer).scales, theirs.get_submodule(layer).scales)
    got16 = outputs(theirs16, ids)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, outputs(ours16, ids))


def test_serving_load_releases_packed_tensors_with_clear_errors(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.nn.qlinear import QuantLinear
    save_quantized("llama", tmp_path / "q", mixed=True)
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    kept = quantkit.load(tmp_path / "q", keep_packed=True)
    lean = quantkit.load(tmp_path / "q")
    assert torch.equal(outputs(kept, ids), outputs(lean, ids))
    layers = [m for m in lean.modules() if isinstance(m, QuantLinear)]
    assert all(m._released and not m._buffers for m in layers)     # int4/int8 kernels own copies
    assert {m.kernel_name() for m in layers} == {"cpu_int4", "cpu_int8"}
    lean.to("cpu").to(torch.bfloat16)                                 # no move: still runs
    assert outputs(lean, ids).dtype == torch.bfloat16
    for action, what in ((lambda: lean.state_dict(), "save it"), (lambda: layers[0].weight, "read"),
                         (lambda: lean.to("meta"), "move it")):
        with pytest.raises(QuantkitError, match=f"cannot {what}.*keep_packed=True"):
            action()
    ref = quantkit.load(tmp_path / "q", kernel="reference")           # the oracle keeps them
    assert all(not m._released for m in ref.modules() if isinstance(m, QuantLinear))
