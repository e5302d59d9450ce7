"""The Python API: quantkit.quantize(model object | path | recipe, tokenizer, calib=..., **overrides)."""
import pytest
import torch
from transformers import AutoTokenizer

import quantkit
from quantkit.errors import QuantkitError
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import TEXT, save_tiny_checkpoints

SMALL = {"calib.n_samples": 8, "calib.seqlen": 32, "group_size": 32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    save_tiny_checkpoints(d, {"llama": tiny_model("llama")})
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_quantize_a_model_object_then_save_and_load(ckpt, tmp_path):
    model, tok = tiny_model("llama"), AutoTokenizer.from_pretrained(ckpt / "llama")
    texts = [TEXT[:len(TEXT) // 2], TEXT[len(TEXT) // 2:]]
    report = quantkit.quantize(model, tok, bits=4, method="gptq", calib=texts, progress=False, **SMALL)
    assert isinstance(report, quantkit.Report) and report.model is model and report.n_layers == 14
    assert report.save(tmp_path / "x") is report and report.size_bytes > 0
    assert report.out == str(tmp_path / "x")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    loaded = quantkit.load(tmp_path / "x", kernel="reference")
    torch.testing.assert_close(logits(loaded, ids), logits(report.model, ids), rtol=0, atol=2e-5)
    saved = AutoTokenizer.from_pretrained(tmp_path / "x")
    assert saved("a single man").input_ids == tok("a single man").input_ids


def test_a_model_object_is_quantized_exactly_as_its_checkpoint_is(ckpt):
    """Same weights, same calibration windows: the object path and the path path agree bit for bit."""
    tok = AutoTokenizer.from_pretrained(ckpt / "llama")
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    calib = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(8)])
    by_object = quantkit.quantize(tiny_model("llama"), tok, calib=calib, progress=False, **SMALL)
    by_path = quantkit.quantize(str(ckpt / "llama"), calib=calib, progress=False, **SMALL)
    assert by_object.packed.keys() == by_path.packed.keys()
    for name, p in by_object.packed.items():
        q = by_path.packed[name]
        assert p.tensors.keys() == q.tensors.keys()
        assert all(torch.equal(t, q.tensors[k]) for k, t in p.tensors.items()), name


def test_text_calibration_draws_the_recipe_windows(ckpt):
    from quantkit.calib.text import user_calibration
    tok = AutoTokenizer.from_pretrained(ckpt / "llama")
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    batches = user_calibration(tok, TEXT, 5, 16, seed=3, batch_size=2)
    assert [b.shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    starts = torch.randint(0, ids.numel() - 16, (5,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(batches), torch.stack([ids[s:s + 16] for s in starts.tolist()]))
    rows = [torch.arange(6), torch.arange(6).reshape(1, 6) + 1]
    assert torch.equal(torch.cat(user_calibration(None, rows, 99, 16, 0, 8)),
                       torch.stack([torch.arange(6), torch.arange(6) + 1]))


@pytest.mark.parametrize("calib, tokenizer, message", [
    ("some text", None, "needs a tokenizer"),
    (None, None, "calibration needs a tokenizer"),
    (torch.rand(4, 8), None, "integer tensor"),
    ([torch.arange(4), torch.arange(5)], None, "different lengths"),
    ([], None, "got list \\(empty\\)"),
    ("too short", "tok", "fewer than one window of 32"),
])
def test_bad_calibration_is_a_clear_error(ckpt, calib, tokenizer, message):
    tok = AutoTokenizer.from_pretrained(ckpt / "llama") if tokenizer else None
    with pytest.raises(QuantkitError, match=message):
        quantkit.quantize(tiny_model("llama"), tok, calib=calib, progress=False, **SMALL)


def test_bad_model_and_impossible_budget_fail_before_any_work(monkeypatch):
    with pytest.raises(QuantkitError, match="must be an nn.Module"):
        quantkit.quantize(42)
    def never(*a, **k):
        raise AssertionError("checked before calibration")
    monkeypatch.setattr("quantkit.pipeline.user_calibration", never)
    with pytest.raises(QuantkitError, match="smallest feasible budget with these options is 2.9524"):
        quantkit.quantize(tiny_model("llama"), calib=torch.zeros(4, 32, dtype=torch.long),
                          bits=1.5, alloc="ip", group_size=32)
    with pytest.raises(QuantkitError, match="unknown field"):
        quantkit.quantize(tiny_model("llama"), bitz=4)
