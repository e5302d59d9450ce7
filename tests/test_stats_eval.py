import math

import torch
import torch.nn.functional as F

from evals.data import load_text
from evals.perplexity import perplexity
from quantkit.stats.hessian import HessianAccumulator
from tests.conftest import tiny_model


def test_hessian_is_token_mean_of_outer_products():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 7, 16, generator=g) for _ in range(4)]
    acc = HessianAccumulator(16)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    st = acc.finalize()
    assert st.n == 84
    assert torch.allclose(st.H.double(), X.T @ X / 84, rtol=1e-5, atol=1e-6)
    assert torch.allclose(st.act_absmax.double(), X.abs().amax(0))


def test_weighted_hessian():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(50, 8, generator=g), torch.rand(50, generator=g)
    acc = HessianAccumulator(8)
    acc.add(x, w)
    expect = (x.T * w) @ x / w.sum()
    assert torch.allclose(acc.finalize().H, expect, rtol=1e-5, atol=1e-6)


def test_weighted_cross_moment_for_fp_target():
    # RSQ token weights with fp_target: the cross moment is Σ w x_ref xᵀ / Σ w, weighted like H,
    # so that the target stays the weighted least-squares one
    g = torch.Generator().manual_seed(2)
    x, x_ref, w = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g), torch.rand(40, generator=g)
    acc = HessianAccumulator(6)
    acc.add(x[:25], w[:25], x_ref[:25])
    acc.add(x[25:], w[25:], x_ref[25:])
    st = acc.finalize()
    assert torch.allclose(st.cross, (x_ref.T * w) @ x / w.sum(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(st.H, (x.T * w) @ x / w.sum(), rtol=1e-5, atol=1e-6)


def test_perplexity_equals_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seqlen=32, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(2):  # 70 // 32 windows, tail dropped
            x = ids[0, w * 32:(w + 1) * 32]
            logp = F.log_softmax(model(x[None]).logits[0].double(), -1)
            for t in range(31):
                nll -= logp[t, x[t + 1]].item()
                count += 1
    assert res["tokens"] == count == 62 and res["windows"] == 2
    assert math.isclose(res["ppl"], math.exp(nll / count), rel_tol=1e-5)


def test_perplexity_with_bos_tiles_the_text_in_steps_of_seqlen_minus_one():
    """Models that need BOS (Gemma): each window is BOS + the next seqlen-1 text tokens, so the
    windows tile the text without a gap or overlap and every text token after the first of a
    window is predicted once; the BOS position predicts the window's first token."""
    model = tiny_model("llama")
    ids = torch.randint(1, 101, (1, 70), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seqlen=32, bos_id=0, progress=False)
    nll = 0.0
    with torch.no_grad():
        for w in range(2):  # 70 // 31 windows
            x = torch.cat([torch.tensor([0]), ids[0, w * 31:(w + 1) * 31]])
            logp = F.log_softmax(model(x[None]).logits[0].double(), -1)
            nll -= sum(logp[t, x[t + 1]].item() for t in range(31))
    assert res["tokens"] == 62 and res["windows"] == 2
    assert math.isclose(res["ppl"], math.exp(nll / 62), rel_tol=1e-5)


def test_bundled_corpora_disjoint():
    for name in ("austen", "pydocs"):
        calib, ev = load_text(name, "calib"), load_text(name, "eval")
        assert len(calib) > 500_000 and len(ev) > 300_000
        # no long passage of the eval text appears in the calibration text
        for start in range(0, len(ev) - 200, len(ev) // 20):
            assert ev[start:start + 200] not in calib
    assert load_text("austen", "eval").startswith("PRIDE AND PREJUDICE")
