"""The bundled domains, the mixed calibration and the multi-domain eval suite."""
import math
import random

import pytest
import torch

from evals import suite
from evals.data import BUNDLED, COMPOSITES, domains, load_text
from evals.perplexity import perplexity
from quantkit.calib.text import calibration_batches
from quantkit.errors import QuantkitError
from tests.conftest import tiny_model


@pytest.mark.parametrize("name", BUNDLED)
def test_calibration_and_eval_parts_share_no_text(name):
    calib, ev = load_text(name, "calib"), load_text(name, "eval")
    assert len(calib) > 300_000 and len(ev) > 100_000
    rng = random.Random(0)
    lines = [ln for ln in ev.splitlines() if len(ln.strip()) >= 60 and not ln.strip().startswith(("#", "[", "|"))]
    # no long eval line appears in the calibration part (short boilerplate like "[1913 Webster]" may)
    hits = [ln for ln in rng.sample(lines, min(300, len(lines))) if ln in calib]
    assert len(hits) <= 3, hits[:3]


def test_folds_partition_the_domains():
    a, b = set(COMPOSITES["fold-a"]), set(COMPOSITES["fold-b"])
    assert not a & b and a | b == set(BUNDLED) == set(COMPOSITES["mix"])
    assert suite.other_fold("fold-a") == "fold-b" and suite.other_fold("fold-b") == "fold-a"
    assert domains("austen, pycode") == ("austen", "pycode") and domains("austen") == ("austen",)
    with pytest.raises(QuantkitError, match="several corpora"):
        load_text("mix", "eval")


class CharTokenizer:
    """Bytes as token ids (every text tokenizes; windows can be found again in the source)."""
    bos_token_id = None

    def __call__(self, text, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([list(text.encode("utf-8", "replace")[:200_000])]) % 101
        return Out()


def test_mixed_calibration_takes_equal_shares_from_each_domain():
    tok = CharTokenizer()
    batches = calibration_batches(tok, "fold-a", 7, 64, seed=3, batch_size=4)
    rows = torch.cat(batches)
    assert [len(b) for b in batches] == [4, 3] and rows.shape == (7, 64)
    names = COMPOSITES["fold-a"]
    text = lambda ids: "," + ",".join(map(str, ids.tolist())) + ","  # noqa: E731
    srcs = {n: text(tok(load_text(n, "calib")).input_ids[0]) for n in names}
    found = [[n for n in names if text(r) in srcs[n]] for r in rows]
    # 7 windows over 3 domains: 3, 2, 2, interleaved a b c a b c a
    assert found == [[names[i % 3]] for i in range(7)]
    # one domain alone reproduces the single-corpus draw exactly (same seed, same windows)
    single = torch.cat(calibration_batches(tok, names[0], 3, 64, seed=3))
    assert torch.equal(single, rows[0::3])


def test_spread_windows_are_evenly_spaced():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 32 * 10), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, ids, 32, progress=False)
    first = perplexity(model, ids, 32, 4, progress=False)
    spread = perplexity(model, ids, 32, 4, progress=False, spread=True)
    picked = torch.cat([ids[:, i * 32:(i + 1) * 32] for i in (0, 3, 6, 9)], dim=1)   # linspace(0, 9, 4)
    assert math.isclose(spread["nll"], perplexity(model, picked, 32, progress=False)["nll"], rel_tol=1e-6)
    assert full["windows"] == 10 and first["windows"] == spread["windows"] == 4
    assert not math.isclose(first["nll"], spread["nll"], rel_tol=1e-6)


def test_suite_ratios_and_geomean_against_a_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    from tests.test_cli import save_tiny_checkpoints
    save_tiny_checkpoints(tmp_path, {"fp": tiny_model("llama", seed=0)})
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "fp")
    other = tiny_model("llama", seed=1)
    res = suite.suite(other, tok, "fold-b", seqlen=32, windows=2, source=str(tmp_path / "fp"), progress=False)
    fp = tiny_model("llama", seed=0)
    expect = {}
    for d in COMPOSITES["fold-b"]:
        ids = tok(load_text(d, "eval"), return_tensors="pt").input_ids
        q = perplexity(other, ids, 32, 2, progress=False, spread=True)["ppl"]
        f = perplexity(fp, ids, 32, 2, progress=False, spread=True)["ppl"]
        assert math.isclose(res["domains"][d]["ppl"], q, rel_tol=1e-6)
        assert math.isclose(res["domains"][d]["fp32_ppl"], f, rel_tol=1e-6)
        expect[d] = q / f
    assert math.isclose(res["geomean_ratio"], math.prod(expect.values()) ** (1 / 3), rel_tol=1e-9)
    # the fp32 baseline is cached: a second call does not load the original again
    monkeypatch.setattr("quantkit.model.loader.load_model", lambda *a, **k: pytest.fail("reloaded"))
    again = suite.suite(other, tok, "fold-b", seqlen=32, windows=2, source=str(tmp_path / "fp"), progress=False)
    assert again["geomean_ratio"] == res["geomean_ratio"]
