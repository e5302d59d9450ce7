"""Exports: compressed-tensors decompresses (with its own package) to our logits; GPTQ v1
tensors unpack, with an unpacker written here from the format's description, to our codes."""
import json
import re

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats.export import export
from quantkit.formats.io import load_tensors, packed_from_tensors, read_manifest
from quantkit.formats.packed import int_parts
from tests.conftest import token_batches
from tests.test_models import outputs
from tests.test_serve import save_quantized

IDS = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]


def our_layers(path):
    return packed_from_tensors(load_tensors(path), read_manifest(path))


def ct_dense_state(path):
    """Decompress every quantized module of an export with compressed-tensors' own code."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from safetensors.torch import load_file
    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(path / "model.safetensors"))
    dense = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[1].startswith("weight_")}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        schemes = [s for s in qc.config_groups.values() if any(match_name(name, t) for t in s.targets)]
        assert len(schemes) == 1, name
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        dense[f"{name}.weight"] = PackedQuantizationCompressor.decompress(local, schemes[0])["weight"]
    return dense


@pytest.mark.parametrize("sym, mixed", [(False, False), (False, True), (True, True)])
def test_compressed_tensors_export_reproduces_our_logits(sym, mixed, tmp_path):
    save_quantized("llama", tmp_path / "q", mixed, sym=sym)
    summary = export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    assert bool(summary["promoted_to_8_bits"]) == mixed    # q/k/v and gate/up share a width
    ref = outputs(quantkit.load(tmp_path / "q", kernel="reference"), IDS)
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "q")).eval()
    missing, unexpected = model.load_state_dict(ct_dense_state(tmp_path / "ct"), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    got = outputs(model, IDS)
    assert (got - ref).norm() / ref.norm() < 2e-3       # fp16 dequantization in compressed-tensors
    if sym:   # transformers loads symmetric pack-quantized through compressed-tensors end to end
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
        got = outputs(hf, IDS)
        assert (got - ref).norm() / ref.norm() < 2e-3


def unpack_gptq_v1(t, bits, in_f, out_f):
    """From the format's description: qweight[i, j] holds rows i*p..i*p+p-1 of column j of Wᵀ,
    value k at bits [k*b, (k+1)*b), p = 32/b; qzeros[g, j] likewise holds zero-1 of outputs
    j*p..j*p+p-1; scales[g, o]; g_idx[i]; W = (q - (stored_zero + 1)) * scale."""
    p, mask = 32 // bits, (1 << bits) - 1
    qw = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    q = torch.empty(in_f, out_f, dtype=torch.int64)
    for k in range(p):
        q[k::p] = (qw >> (bits * k)) & mask
    qz = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = torch.empty(qz.shape[0], out_f, dtype=torch.int64)
    for k in range(p):
        z[:, k::p] = (qz >> (bits * k)) & mask
    return q.T, (z + 1).T, t["scales"].float().T, t["g_idx"].long()


@pytest.mark.parametrize("mixed, act_order, sym", [(False, False, True), (True, True, True),
                                                   (False, True, False), (True, False, False)])
def test_gptq_export_unpacks_to_our_codes(mixed, act_order, sym, tmp_path):
    """Asymmetric layers too: their zero points differ per output channel, so a permutation of
    the packed zeros across channels shows in the dequantized weight."""
    save_quantized("llama", tmp_path / "q", mixed, sym=sym, act_order=act_order, static_groups=not act_order)
    summary = export(tmp_path / "q", tmp_path / "gptq", "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    tensors = load_tensors(tmp_path / "gptq")
    for name, p in our_layers(tmp_path / "q").items():
        bits = config["bits"]
        for pattern, override in config.get("dynamic", {}).items():
            if re.match(pattern[2:], name):
                bits = override["bits"]
        codes, scales, zeros, g_idx = int_parts(p)
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        q, z, s, gi = unpack_gptq_v1(t, bits, p.shape[1], p.shape[0])
        off = 120 if name in summary["promoted_to_8_bits"] else 0
        assert bits == p.meta["bits"] + (4 if off else 0)
        assert torch.equal(q, codes.long() + off)
        W = (q - z[:, gi]) * s[:, gi]
        assert torch.equal(W, p.dequantize())
        assert torch.equal(z[:, gi], zeros[:, g_idx].long() + off)
        assert ("g_idx" in p.tensors) == act_order
        if act_order:
            assert torch.equal(gi, p.tensors["g_idx"].long())
    assert mixed == ("dynamic" in config)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    save_quantized("llama", tmp_path / "q3", bits=3)
    with pytest.raises(QuantkitError, match="3-bit.*only 4- and 8-bit"):
        export(tmp_path / "q3", tmp_path / "x", "gptq")
    save_quantized("llama", tmp_path / "qa", act_order=True, static_groups=False)
    with pytest.raises(QuantkitError, match="act-order.*--format gptq"):
        export(tmp_path / "qa", tmp_path / "x", "compressed-tensors")
    def positive_q(model):          # a group of positive weights gets zero point 0
        w = model.model.layers[0].self_attn.q_proj.weight
        w.data = w.data.abs()
    save_quantized("llama", tmp_path / "z0", edit=positive_q)
    with pytest.raises(QuantkitError, match="q_proj has zero point 0"):
        export(tmp_path / "z0", tmp_path / "x", "gptq")
    export(tmp_path / "z0", tmp_path / "ct", "compressed-tensors")   # stores zeros as they are
    assert not (tmp_path / "x").exists()
    with pytest.raises(QuantkitError, match="unknown export format"):
        export(tmp_path / "q3", tmp_path / "x", "gguf")
