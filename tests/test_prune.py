"""N:M pruning: masks, the magnitude / Wanda / SparseGPT baselines, ARMOR as a pruner, the pipeline."""
import json

import pytest
import torch

import quantkit
from cli import main
from quantkit.errors import QuantkitError
from quantkit.formats.sparse import sparse_core
from quantkit.prune.mask import is_nm, nm_mask, parse_pattern
from quantkit.prune.pruners import armor, magnitude, sparsegpt, wanda
from quantkit.quant.base import LayerStats, QSpec
from quantkit.quant.gptq import gptq_codes, inverse_hessian_factor
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import save_tiny_checkpoints


def layer(out_f=24, in_f=64, seed=0):
    """A weight and a correlated, uneven input second moment (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(512, in_f, generator=g) @ (torch.eye(in_f) + 0.4 * torch.randn(in_f, in_f, generator=g))
    X = X * torch.linspace(0.2, 3, in_f)
    return W, LayerStats(H=X.t() @ X / len(X), n=len(X))


def proxy(W, Q, H):
    E = W - Q
    return float((E @ H * E).sum())


def test_nm_mask_keeps_the_largest_n_of_every_m():
    s = torch.tensor([[0.1, 5.0, 3.0, -1.0, 7.0, 6.0, 0.0, 8.0]])
    assert nm_mask(s).tolist() == [[False, True, True, False, True, False, False, True]]
    m = nm_mask(torch.randn(16, 48), 3, 8)
    assert is_nm(m, 3, 8) and not is_nm(m, 2, 4)
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("2-4", "4:4", "0:4", "a:b"):
        with pytest.raises(QuantkitError, match="pattern"):
            parse_pattern(bad)
    with pytest.raises(QuantkitError, match="multiple of 4"):
        nm_mask(torch.randn(4, 10))


def test_magnitude_and_wanda_keep_their_scores_top_two_unchanged():
    W, st = layer()
    for fn, score in ((magnitude, W.abs()), (wanda, W.abs() * st.H.diagonal().sqrt())):
        core, keep = sparse_core(fn(W, st, None))
        assert torch.equal(keep, nm_mask(score)) and is_nm(keep)
        assert torch.equal(core, (W * keep).half().float())
    assert not torch.equal(sparse_core(magnitude(W, st, None))[1], sparse_core(wanda(W, st, None))[1])


def sparsegpt_reference(W, H, n, m, damp):
    """SparseGPT written from the paper, one column at a time, no lazy batching."""
    W = W.clone()
    U = inverse_hessian_factor(H, damp)
    keep = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if i % m == 0:
            score = W[:, i:i + m] ** 2 / U.diagonal()[i:i + m] ** 2
            keep[:, i:i + m].scatter_(1, score.topk(n, dim=1).indices, True)
        err = (W[:, i] * ~keep[:, i]) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None]
    return W * keep, keep


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_sparsegpt_matches_a_reference_written_from_the_paper(n, m):
    W, st = layer(in_f=256)
    ref, keep_ref = sparsegpt_reference(W, st.H, n, m, 0.01)
    core, keep = sparse_core(sparsegpt(W, st, None, n, m))
    assert torch.equal(keep, keep_ref) and is_nm(keep, n, m)
    assert (core - ref).abs().max() < 2e-3 * ref.abs().max()     # fp16 values
    # the OBS update beats both weight-preserving baselines on the layer's own loss
    losses = [proxy(W, sparse_core(f(W, st, None))[0], st.H) for f in (sparsegpt, wanda, magnitude)]
    assert losses[0] < 0.8 * losses[1] and losses[1] < losses[2]


def test_diagonal_hessian_makes_sparsegpt_wanda():
    W, _ = layer()
    d = torch.linspace(0.1, 4, W.shape[1])
    spec = QSpec(act_order=False, damp=0.0)
    r = gptq_codes(W, torch.diag(d), spec, keep=torch.zeros_like(W, dtype=torch.bool), nm=(2, 4),
                   round_values=False)
    assert torch.equal(r.keep, nm_mask(W.abs() * d.sqrt())) and torch.equal(r.codes, W * r.keep)


def test_fixed_full_mask_is_plain_gptq():
    W, st = layer()
    spec = QSpec(bits=3, group_size=16, act_order=False)
    plain = gptq_codes(W, st.H, spec)
    masked = gptq_codes(W, st.H, spec, keep=torch.ones_like(W, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(plain[:5], masked[:5]))


@pytest.mark.parametrize("fn", [magnitude, wanda, sparsegpt])
def test_quantized_kept_weights_are_on_the_grid_and_pruned_ones_zero(fn):
    W, st = layer()
    spec = QSpec(bits=4, group_size=32)
    p = fn(W, st, spec)
    Q, keep = sparse_core(p)
    assert is_nm(keep) and p.meta["bits"] == 4 and (Q[~keep] == 0).all()
    fp = sparse_core(fn(W, st, None))[0]
    # 4-bit rounding adds a little to the pruning loss, not a lot (for magnitude and Wanda the
    # quantized version even gains: GPTQ's error feedback moves the kept weights, their fp one does not)
    assert proxy(W, Q, st.H) < 1.5 * proxy(W, fp, st.H)
    if fn is sparsegpt:
        assert proxy(W, fp, st.H) <= proxy(W, Q, st.H)


def test_armor_pruner_refit_only_lowers_the_full_hessian_loss():
    W, st = layer(out_f=64, in_f=64)
    plain = armor(W, st, None, block_size=16, iters=30, refit=False)
    refit = armor(W, st, None, block_size=16, iters=30, refit=True)
    assert is_nm(sparse_core(refit)[1])
    assert proxy(W, refit.dequantize(), st.H) <= proxy(W, plain.dequantize(), st.H)
    q = armor(W, st, QSpec(bits=4, group_size=32), block_size=16, iters=30)
    assert q.meta["bits"] == 4 and q.meta["block_size"] == 16 and is_nm(sparse_core(q)[1])
    with pytest.raises(QuantkitError, match="multiple of 4"):
        armor(W, st, QSpec(bits=4, group_size=30), block_size=16, iters=1)


@pytest.mark.parametrize("spec", [None, QSpec(bits=4, group_size=32, act_order=False)])
def test_armor_from_a_baseline_never_ends_above_it(spec):
    """Started from SparseGPT's mask, the layer's tr(E H Eᵀ) is at most SparseGPT's; where the
    baseline is kept the layer stores no wrappers, so it is SparseGPT's layer exactly."""
    wrapped = []
    for seed in range(3):
        W, st = layer(out_f=32, in_f=64, seed=seed)
        base = sparsegpt(W, st, spec)
        for iters in (0, 20):
            p = armor(W, st, spec, block_size=16, iters=iters, init="sparsegpt")
            assert proxy(W, p.dequantize(), st.H) <= proxy(W, base.dequantize(), st.H)
            wrapped.append("pre" in p.tensors)
            if not wrapped[-1]:
                assert p.tensors.keys() == base.tensors.keys()
                assert all(torch.equal(t, base.tensors[k]) for k, t in p.tensors.items())
    assert not all(wrapped)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune")
    save_tiny_checkpoints(d, {"llama": tiny_model("llama")})
    return d


def _args(ckpt):
    return ["--n-samples", "8", "--calib-seqlen", "32", "--calib-dataset", str(ckpt / "text.txt")]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("cmd", [["prune", "--method", "sparsegpt"],
                                 ["prune", "--method", "armor", "--iters", "20", "--block-size", "16"],
                                 ["quantize", "--prune", "wanda", "--bits", "4", "--group-size", "16"]])
def test_cli_prune_saves_2_4_layers_that_load_back(ckpt, tmp_path, cmd):
    out, j = tmp_path / "p", tmp_path / "p.json"
    assert main([cmd[0], str(ckpt / "llama"), *cmd[1:], "--out", str(out), "--json", str(j), *_args(ckpt)]) == 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert len(layers) == 14 and all(v["format"] == "sparse" and (v["n"], v["m"]) == (2, 4) for v in layers.values())
    loaded = quantkit.load(out, kernel="reference", keep_packed=True)
    for name in layers:
        assert is_nm(sparse_core(loaded.get_submodule(name).packed)[1])
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    fast = quantkit.load(out)
    ref = logits(loaded, ids)
    assert (logits(fast, ids) - ref).norm() / ref.norm() < 2e-2
    s = json.loads(j.read_text())
    assert (s["bits_per_weight"] < 6) == ("--bits" in cmd)
    assert main(["inspect", str(out), "--json", str(j)]) == 0
    ins = json.loads(j.read_text())
    assert ("wrapper_params" in ins) == ("armor" in cmd)


def test_prune_errors_name_the_fix(ckpt, tmp_path):
    base = [str(ckpt / "llama"), "--out", str(tmp_path / "x"), *_args(ckpt)]
    for extra, msg in ((["--prune", "armor", "--bits", "3.5", "--alloc", "ip"], "mixed precision"),
                       (["--prune", "armor", "--method", "rtn"], "--method gptq"),
                       (["--prune", "nope"], "unknown pruner"),
                       (["--prune", "wanda", "--pattern", "2-4"], "N:M")):
        with pytest.raises(QuantkitError, match=msg):
            _raise(["quantize", *base, *extra])
    assert not (tmp_path / "x").exists()


def _raise(argv):
    from cli import build_parser, cmd_quantize
    cmd_quantize(build_parser().parse_args(argv))
