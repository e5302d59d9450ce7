"""RSQ: exact rotation, token importance, GPTQ equivalence, and the pipeline end to end."""
import json
import warnings

import pytest
import torch

import quantkit
from cli import main
from quantkit.errors import QuantkitError
from quantkit.model.discovery import find_blocks
from quantkit.model.runner import capture_inputs, input_groups
from quantkit.stats.hessian import collect_hessians
from quantkit.pipeline import compress_model, run
from quantkit.quant.base import QSpec
from quantkit.quant.gptq import gptq
from quantkit.quant.rotation import OnlineHadamard, hadamard, hadamard_factors, random_orthogonal, rotate_model
from quantkit.quant.rsq import rsq
from quantkit.recipe import CalibConfig, Recipe
from quantkit.stats.importance import (attention_probs, attention_weights, first_n_weights, rescale,
                                       token_weighting, uniform_weights)
from tests.conftest import HIDDEN, VOCAB, tiny_model, token_batches
from tests.test_cli import save_tiny_checkpoints
from tests.test_models import outputs, plan_for

CPU = torch.device("cpu")


def perturbed(family: str, tied: bool = False, seed: int = 0):
    """A tiny model whose norms and biases are not the identity, so folding them is tested."""
    model = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return model


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 64, 80, 144, 576])
def test_hadamard_constructions(n):
    H = hadamard(n)
    assert H is not None and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.t(), n * torch.eye(n, dtype=H.dtype))
    Q = random_orthogonal(n, seed=3)
    assert torch.allclose(Q @ Q.t(), torch.eye(n, dtype=Q.dtype), atol=1e-12)
    assert torch.equal(Q, random_orthogonal(n, seed=3))


def test_no_hadamard_falls_back_to_random_orthogonal_with_a_warning():
    assert hadamard(6) is None and hadamard(100) is None
    with pytest.warns(UserWarning, match="no Hadamard construction of order 6"):
        Q = random_orthogonal(6, seed=0)
    assert torch.allclose(Q @ Q.t(), torch.eye(6, dtype=Q.dtype), atol=1e-12)


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama", False), ("mistral", False),
                                          ("qwen2", True)])
def test_rotation_keeps_fp_logits(family, tied):
    model = perturbed(family, tied)
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    ref = outputs(model, ids)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # hidden 80 and head 20 have Hadamard matrices
        rotate_model(model, seed=0)
    got = outputs(model, ids)
    assert (got - ref).abs().max() < 1e-4
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert all(b.mlp.down_proj.input_hadamard == [12, 12] for b in model.model.layers)


def test_rotation_without_the_residual_keeps_norms_embeddings_and_logits():
    """residual=False: an online Hadamard on every block linear's input, values rotated per
    head; the norms, the (tied) embeddings and the head are untouched, the logits unchanged."""
    model = perturbed("llama", tied=True)
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    ref, before = outputs(model, ids), {n: p.detach().clone() for n, p in model.named_parameters()}
    rotate_model(model, seed=0, residual=False)
    assert (outputs(model, ids) - ref).abs().max() < 1e-4
    lins = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    assert {n for n in lins if model.get_submodule(n).input_hadamard} == lins
    same = {n for n, p in model.named_parameters() if torch.equal(p, before[n])}
    assert same == {n for n in before if "layers" not in n or "norm" in n}   # only block linears change
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is True


@pytest.mark.parametrize("n, ab", [(144, (12, 12)), (1536, (32, 48)), (576, (24, 24)), (80, (4, 20))])
def test_online_hadamard_is_the_kronecker_product_in_two_small_matmuls(n, ab):
    assert hadamard_factors(n) == ab
    t = OnlineHadamard(*ab)
    M = t.matrix()
    assert torch.allclose(M @ M.t(), torch.eye(n, dtype=M.dtype), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(t(x), x @ M, atol=1e-12)
    assert hadamard_factors(6) is None


def test_online_hadamard_off_leaves_down_proj_alone():
    model = perturbed("llama")
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    rotate_model(model, seed=0, online=False)
    assert not hasattr(model.model.layers[0].mlp.down_proj, "input_hadamard")
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, down)   # outputs still rotated


def test_rotation_rejects_other_architectures():
    with pytest.raises(QuantkitError, match="GPT2LMHeadModel.*'gpt2'"):
        rotate_model(tiny_model("gpt2"))


def test_rescale_maps_each_sequence_to_the_range_with_mean_one():
    s = torch.tensor([[3.0, 1.0, 2.0, 1.0], [10.0, 0.0, 5.0, 5.0]])
    w = rescale(s, 0.005, 1.0)
    assert torch.allclose(w.mean(-1), torch.ones(2))
    r = w / w.amax(-1, keepdim=True)                   # back to [r_min, r_max] = [0.005, 1]
    assert torch.allclose(r.amin(-1), torch.full((2,), 0.005))
    assert torch.equal(w.argsort(-1), s.argsort(-1))


def _block0(model):
    _, blocks = find_blocks(model)
    return blocks[0], capture_inputs(model, blocks[0], token_batches(), CPU)


def test_attention_importance_is_causal_and_normalised():
    model = tiny_model("llama")
    block, inputs = _block0(model)
    A = attention_probs(block, inputs, 0)
    B, T = inputs.hidden[0].shape[:2]
    assert A.shape == (B, 4, T, T)
    assert torch.allclose(A.sum(-1), torch.ones(B, 4, T), atol=1e-5)
    assert A.triu(1).abs().max() == 0                  # no query attends to a later token
    assert model.config._attn_implementation == "sdpa"   # switched back after use
    w = attention_weights(0.005, 1.0)(block, inputs)
    assert len(w) == len(inputs.hidden) and w[0].shape == (B, T)
    assert torch.allclose(w[0].mean(-1), torch.ones(B))
    assert torch.allclose(w[0].amin(-1) / w[0].amax(-1), torch.full((B,), 0.005))
    first = first_n_weights(8)(block, inputs)[0]
    assert torch.equal(first[:, 8:], torch.zeros(B, T - 8)) and torch.allclose(first.mean(-1), torch.ones(B))
    with pytest.raises(QuantkitError, match="unknown rsq.importance 'nope'"):
        token_weighting("nope")


def test_token_weights_give_the_weighted_hessian():
    model = tiny_model("llama")
    block, inputs = _block0(model)
    group = input_groups(block, inputs)[:1]               # q/k/v read the normed hidden state
    weights = attention_weights()(block, inputs)
    H = collect_hessians(block, inputs, group, token_weights=weights)[group[0][0]].finalize().H
    xs = []
    lead = block.self_attn.q_proj
    h = lead.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, HIDDEN)))
    for i in range(len(inputs.hidden)):
        block(inputs.hidden[i], **inputs.kwargs[i])
    h.remove()
    X, w = torch.cat(xs), torch.cat([x.reshape(-1) for x in weights])
    assert torch.allclose(H, (X.t() * w) @ X / w.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fp_target", [False, True])
def test_rsq_with_uniform_weights_and_no_rotation_is_gptq(fp_target):
    spec = QSpec(bits=3, group_size=32)
    res = []
    for compressor, weights in ((gptq, None), (rsq, uniform_weights())):
        model = tiny_model("llama")
        res.append(compress_model(model, token_batches(), plan_for(model, spec), compressor, CPU,
                                  fp_target=fp_target, progress=False, token_weights=weights)[0])
    assert res[0].keys() == res[1].keys()
    for name in res[0]:
        a, b = res[0][name].tensors, res[1][name].tensors
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_attention_weighting_is_gptq_on_the_weighted_hessian():
    """Block 0's q_proj under RSQ: GPTQ's codes on H = X diag(w) Xᵀ / Σ w, w from attention,
    computed here from the block's inputs; not those of the unweighted Hessian."""
    spec = QSpec(bits=3, group_size=32)
    model = tiny_model("llama")
    a, _ = compress_model(model, token_batches(), plan_for(model, spec), rsq, CPU, progress=False,
                          token_weights=attention_weights())
    model = tiny_model("llama")
    block, inputs = _block0(model)
    group = input_groups(block, inputs)[:1]
    for weights, same in ((attention_weights()(block, inputs), True), (None, False)):
        stats = collect_hessians(block, inputs, group, token_weights=weights)[group[0][0]].finalize()
        ref = gptq(block.self_attn.q_proj.weight.detach().float(), stats, spec)
        got = a["model.layers.0.self_attn.q_proj"].tensors["qweight"]
        assert torch.equal(got, ref.tensors["qweight"]) == same


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rsq")
    save_tiny_checkpoints(d, {"llama": perturbed("llama", tied=True)})
    return d


@pytest.mark.parametrize("residual", [True, False])
def test_rsq_pipeline_saves_and_loads_the_same_model(tied_ckpt, tmp_path, residual):
    calib = CalibConfig(dataset=str(tied_ckpt / "text.txt"), n_samples=8, seqlen=32)
    recipe = Recipe(model=str(tied_ckpt / "llama"), method="rsq", bits=3, group_size=32,
                    out=str(tmp_path / "q"), calib=calib).with_overrides(
                        **{"rsq.seed": 1, "rsq.residual": residual})
    rep = run(recipe, progress=False)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    fake = outputs(rep.model, ids)
    loaded = quantkit.load(tmp_path / "q", kernel="reference")
    assert loaded.config.tie_word_embeddings is not residual
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) is not residual
    assert (outputs(loaded, ids) - fake).norm() / fake.norm() < 1e-5
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")        # the fast kernel, bf16 activations
    assert torch.equal(outputs(hf, ids), outputs(quantkit.load(tmp_path / "q"), ids))
    assert (outputs(hf, ids) - fake).norm() / fake.norm() < 1e-2
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["recipe"]["rsq"]["seed"] == 1 and len(saved["layers"]) == 14
    online = {n: v["input_hadamard"] for n, v in saved["layers"].items() if "input_hadamard" in v}
    downs = {f"model.layers.{i}.mlp.down_proj": [12, 12] for i in range(2)}
    assert online == (downs if residual else {**{n: [4, 20] for n in saved["layers"]}, **downs})
    from quantkit.formats.export import export
    with pytest.raises(QuantkitError, match="online Hadamard.*quantize without them"):
        export(tmp_path / "q", tmp_path / "ct", "gptq")


def test_cli_rsq_with_ip_allocation(tied_ckpt, tmp_path):
    out, j = tmp_path / "ip", tmp_path / "ip.json"
    assert main(["quantize", str(tied_ckpt / "llama"), "--method", "rsq", "--bits", "3.5", "--alloc", "ip",
                 "--group-size", "32", "--out", str(out), "--n-samples", "8", "--calib-seqlen", "32",
                 "--calib-dataset", str(tied_ckpt / "text.txt"), "--json", str(j)]) == 0
    s = json.loads(j.read_text())
    assert s["method"] == "rsq" and s["bits_per_weight"] <= 3.5 + 1e-9
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert len({v["bits"] for v in layers.values()}) > 1
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(outputs(quantkit.load(out, kernel="reference"), ids)).all()
