"""Every supported family: discovery, block runner, GPTQ, save -> quantkit.load -> same logits."""
from functools import partial

import pytest
import torch

import quantkit
from quantkit.formats.io import atomic_dir, save_packed
from quantkit.model.discovery import find_blocks, linears
from quantkit.model.runner import capture_inputs, input_groups
from quantkit.stats.hessian import collect_hessians
from quantkit.pipeline import compress_model
from quantkit.quant.base import QSpec
from quantkit.quant.gptq import gptq, gptq_baq
from tests.conftest import EXPECTED_LINEARS, FAMILIES, LAYERS, tiny_model, token_batches


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def plan_for(model, spec):
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": spec for i, b in enumerate(blocks) for n in linears(b)}


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery(family):
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    assert len(blocks) == LAYERS
    assert len(linears(blocks[0])) == EXPECTED_LINEARS[family]


def test_llama_input_groups_follow_data_flow():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], token_batches(), torch.device("cpu"))
    assert input_groups(blocks[0], inputs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("family, compressor", [(f, gptq) for f in FAMILIES] + [("llama", partial(gptq_baq, keep_better=False))])
def test_quantize_save_load_roundtrip(family, compressor, tmp_path):
    model = tiny_model(family)
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    ref_fp = outputs(model, ids)
    spec = QSpec(bits=4, group_size=32)
    packed, info = compress_model(model, token_batches(), plan_for(model, spec), compressor,
                                  torch.device("cpu"), progress=False)
    assert len(packed) == LAYERS * EXPECTED_LINEARS[family]
    fake = outputs(model, ids)
    assert 0 < (fake - ref_fp).norm() / ref_fp.norm() < 0.5   # quantized, not garbage
    with atomic_dir(tmp_path / "ckpt") as d:
        save_packed(d, model, packed, {})
    loaded = quantkit.load(tmp_path / "ckpt", kernel="reference")
    got = outputs(loaded, ids)
    assert (got - fake).norm() / fake.norm() < 1e-5
    fast = outputs(quantkit.load(tmp_path / "ckpt"), ids)     # CPU int4 path, bf16 activations
    assert (fast - fake).norm() / fake.norm() < 1e-2


def test_true_sequential_sees_quantized_inputs():
    """Later groups' Hessians come from the already-quantized earlier layers."""
    spec = QSpec(bits=2, group_size=32)
    a, b = tiny_model("llama"), tiny_model("llama")
    pa, _ = compress_model(a, token_batches(), plan_for(a, spec), gptq, torch.device("cpu"),
                           true_sequential=True, progress=False)
    pb, _ = compress_model(b, token_batches(), plan_for(b, spec), gptq, torch.device("cpu"),
                           true_sequential=False, progress=False)
    q = "model.layers.0.self_attn.q_proj"
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(pa[q].tensors["qweight"], pb[q].tensors["qweight"])
    # reference: quantize q/k/v here, then o_proj on the Hessian of its now quantized inputs
    c = tiny_model("llama")
    block = find_blocks(c)[1][0]
    inputs = capture_inputs(c, block, token_batches(), torch.device("cpu"))
    qkv, [o_name] = input_groups(block, inputs)[:2]
    stats = collect_hessians(block, inputs, [qkv])[qkv[0]].finalize()
    for n in qkv:
        mod = block.get_submodule(n)
        mod.weight.data = gptq(mod.weight.detach().float(), stats, spec).dequantize()
    o_stats = collect_hessians(block, inputs, [[o_name]])[o_name].finalize()
    ref = gptq(block.get_submodule(o_name).weight.detach().float(), o_stats, spec)
    assert torch.equal(pa[o].tensors["qweight"], ref.tensors["qweight"])
    assert not torch.equal(pb[o].tensors["qweight"], ref.tensors["qweight"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp_target_reduces_output_error(family):
    ids = token_batches(n=8, seqlen=32, batch=8, seed=5)[0]
    errs = []
    for fp_target in (False, True):
        model = tiny_model(family)
        ref = outputs(model, ids)
        compress_model(model, token_batches(n=16, seqlen=64, batch=4), plan_for(model, QSpec(bits=3, group_size=32)),
                       gptq, torch.device("cpu"), fp_target=fp_target, progress=False)
        errs.append(float((outputs(model, ids) - ref).norm() / ref.norm()))
    assert errs[1] < 0.9 * errs[0], errs
