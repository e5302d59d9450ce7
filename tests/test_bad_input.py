"""Broken checkpoints and degenerate statistics: one clear QuantkitError each, no output written;
dead inputs are handled, not fatal."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import main
from quantkit import registry
from quantkit.errors import QuantkitError
from quantkit.model.discovery import find_blocks
from quantkit.model.loader import load_model
from quantkit.quant.base import LayerStats, QSpec, fp_target_weight
from tests.conftest import tiny_model
from tests.test_cli import save_tiny_checkpoints

W = "model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    save_tiny_checkpoints(d, {"llama": tiny_model("llama")})
    return d / "llama"


def broken(src, tmp_path, edit):
    p = tmp_path / "broken"
    shutil.copytree(src, p)
    edit(p)
    return p


def edit_tensors(fn):
    def edit(p):
        t = load_file(p / W)
        fn(t)
        save_file(t, p / W, metadata={"format": "pt"})
    return edit


def shard(p):
    """Split the weights into two shards with an index, as transformers writes big models."""
    t = load_file(p / W)
    keys = sorted(t)
    parts = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for f, ks in parts.items():
        save_file({k: t[k] for k in ks}, p / f, metadata={"format": "pt"})
    (p / W).unlink()
    (p / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))


CASES = {
    "truncated": (lambda p: (p / W).write_bytes((p / W).read_bytes()[:4096]),
                  r"model.safetensors: corrupt or truncated safetensors file .*download it again"),
    "garbage header": (lambda p: (p / W).write_bytes(b"\xff" * 64),
                       "corrupt or truncated safetensors file"),
    "no weights": (lambda p: (p / W).unlink(), "no weights .* beside config.json"),
    "missing shard": (lambda p: (shard(p), (p / "model-00002-of-00002.safetensors").unlink()),
                      r"shard model-00002-of-00002.safetensors is missing \(1 of 2"),
    "truncated shard": (lambda p: (shard(p), (p / "model-00001-of-00002.safetensors").write_bytes(
        (p / "model-00001-of-00002.safetensors").read_bytes()[:-8])), "00001-of-00002.safetensors: corrupt"),
    "wrong shape": (edit_tensors(lambda t: t.update({Q_PROJ: t[Q_PROJ][:, :-1].contiguous()})),
                    rf"tensor {Q_PROJ} has shape \[80, 79\] but config.json implies \[80, 80\]"),
    "nan": (edit_tensors(lambda t: t[Q_PROJ].__setitem__((0, 0), float("nan"))),
            rf"weight {Q_PROJ} holds 1 NaN/Inf values \(1 tensors"),
    "inf": (edit_tensors(lambda t: t["model.norm.weight"].__setitem__(3, float("inf"))),
            "weight model.norm.weight holds 1 NaN/Inf"),
    "config not json": (lambda p: (p / "config.json").write_text("{not json"),
                        "config.json: corrupt config.json"),
    "config field": (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "hidden_size": "big"})), "hidden_size"),
    "quantkit output": (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()),
         "quantization_config": {"quant_method": "quantkit"}})), "already quantized by quantkit"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_checkpoint_is_one_clear_error_and_writes_nothing(src, tmp_path, case, capsys):
    edit, message = CASES[case]
    p = broken(src, tmp_path, edit)
    with pytest.raises(QuantkitError, match=message):
        load_model(str(p))
    out = tmp_path / "out"
    rc = main(["quantize", str(p), "--method", "gptq", "--group-size", "32", "--n-samples", "4",
               "--calib-seqlen", "32", "--calib-dataset", str(src.parent / "text.txt"), "--out", str(out)])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "error" in line.lower()]   # beside progress bars
    assert rc == 2 and len(said) == 1 and said[0].startswith("quantkit: error: ") and \
        "Traceback" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == [p]


def test_the_intact_checkpoint_loads(src):
    model, _, _ = load_model(str(src))                 # the checks pass on a good checkpoint
    p = broken(src, src.parent.parent / "sharded", shard)
    sharded, _, _ = load_model(str(p))
    for (n, a), (m, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_unsupported_architecture_names_the_modules_found():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.LayerNorm(4))
    with pytest.raises(QuantkitError, match=r"modules \(GELU, LayerNorm, Linear\); supported"):
        find_blocks(m)


def test_fp_target_with_dead_inputs_solves_on_the_live_ones():
    torch.manual_seed(0)
    W_, X = torch.randn(8, 16), torch.randn(200, 16)
    X[:, [3, 9]] = 0                                     # inputs that never fire
    X_fp = X + 0.1 * torch.randn_like(X)
    X_fp[:, [3, 9]] = 0
    H, C = X.T @ X / len(X), X_fp.T @ X / len(X)
    V = fp_target_weight(W_, LayerStats(H=H, n=200, cross=C), damp=0.0)
    live = [j for j in range(16) if j not in (3, 9)]
    ref = W_.clone()
    ref[:, live] += (W_ @ (C - H))[:, live] @ torch.linalg.inv(H[live][:, live])
    torch.testing.assert_close(V, ref, rtol=1e-4, atol=1e-5)
    dead = LayerStats(H=torch.zeros(16, 16), n=200, cross=torch.zeros(16, 16))    # a dead layer
    assert torch.equal(fp_target_weight(W_, dead), W_)
    spec = QSpec(bits=3, group_size=-1, mse=False)
    q = registry.get("compressor", "gptq")(W_, dead, spec)          # nothing to feed back
    assert torch.isfinite(q.dequantize()).all()


def test_a_model_with_a_dead_layer_quantizes(src, tmp_path):
    import quantkit
    p = broken(src, tmp_path, edit_tensors(
        lambda t: t["model.layers.0.input_layernorm.weight"].zero_()))    # q/k/v see only zeros
    rep = quantkit.quantize(str(p), method="gptq", progress=False, out=str(tmp_path / "q"),
                            **{"group_size": 32, "calib.n_samples": 4, "calib.seqlen": 32,
                               "calib.dataset": str(src.parent / "text.txt")})
    assert rep.recipe.fp_target and (tmp_path / "q" / W).is_file()
    assert all(torch.isfinite(t).all() for pk in rep.packed.values() for t in pk.tensors.values()
               if t.is_floating_point())


@pytest.mark.parametrize("overrides, message", [
    ({"bits": "four"}, r"recipe.bits: 'four' is not a valid float"),
    ({"fp_target": 1}, r"recipe.fp_target: 1 is not a valid bool"),
    ({"calib.n_samples": 2.5}, r"recipe.calib.n_samples: 2.5 is not a valid int"),
    ({"calib.seqlen": 0}, r"recipe.calib.seqlen: 0 must be at least 1"),
    ({"group_size": 0}, r"group_size: 0 must be at least 1 \(or -1"),
    ({"bit_options": [4, None]}, r"bit_options: \[4, None\] is not a valid list of int or str"),
    ({"eval.max_windows": "all"}, r"max_windows: 'all' is not a valid int \(or null\)"),
])
def test_recipe_values_are_type_and_range_checked(overrides, message):
    from quantkit.recipe import Recipe
    with pytest.raises(QuantkitError, match=message):
        Recipe().with_overrides(**overrides)
    assert Recipe().with_overrides(group_size=-1, bits=3, **{"eval.max_windows": None}).group_size == -1
