"""LLM.int8(): vector-wise int8 with outlier decomposition, against independent references."""
import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats.io import atomic_dir, save_packed
from quantkit.formats.llm_int8 import make_llm_int8
from quantkit.kernels import KERNELS, select
from quantkit.pipeline import compress_model
from quantkit.quant.base import LayerStats, QSpec
from quantkit.quant.llm_int8 import llm_int8
from tests.conftest import tiny_model, token_batches
from tests.test_models import outputs, plan_for


def vectorwise_int8(x, W):
    """Plain vector-wise int8 written from the paper: rows of x and of W to absmax int8."""
    cx, cw = x.abs().amax(1, keepdim=True), W.abs().amax(1, keepdim=True)
    x8, w8 = torch.round(127 * x / cx), torch.round(127 * W / cw)
    return (x8.double() @ w8.double().T).float() * (cx * cw.T) / 127**2


def layer(out_f=96, in_f=200, seed=0, threshold=6.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    return W, make_llm_int8(W, threshold), torch.randn(16, in_f, generator=g)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", ["cpu_llm_int8", "llm_int8_emulated"])
def test_threshold_inf_is_plain_vectorwise_int8(name):
    W, p, x = layer(threshold=float("inf"))
    x[:, 3] *= 40                                   # outliers present, but never split off
    got = KERNELS[name].prepare(p, None)(x)
    assert rel(got, vectorwise_int8(x, W)) < 1e-6


def test_outlier_decomposition_keeps_the_error_where_plain_int8_loses_it():
    """Errors against the fp16 layer (x, W rounded to fp16). On normal inputs int8 has some
    error e; with planted large-magnitude input features, LLM.int8 stays within 2e while plain
    vector-wise int8 (threshold = inf) grows past 10e: one outlier sets the whole row's scale.
    As in LLMs, the outlier features are huge but do not dominate the outputs (small weights);
    calibration found them, so their weight columns are kept in fp16 as well."""
    W, _, x = layer(seed=1)
    cols = [5, 77, 150]
    W[:, cols] *= 0.2
    p = make_llm_int8(W, 6.0, torch.tensor(cols))
    fp16 = lambda x: x.half().float() @ W.half().float().T   # noqa: E731
    int8 = KERNELS["cpu_llm_int8"].prepare(make_llm_int8(W, float("inf")), None)
    e_normal = rel(int8(x), fp16(x))
    planted = x.clone()
    planted[:, cols] *= 60                          # |x| ~ 60 >> 6 in three features
    decomposed = KERNELS["cpu_llm_int8"].prepare(p, None)(planted)
    assert rel(decomposed, fp16(planted)) < 2 * e_normal
    assert rel(int8(planted), fp16(planted)) > 10 * e_normal
    detected_only = KERNELS["cpu_llm_int8"].prepare(make_llm_int8(W), None)(planted)
    assert rel(detected_only, fp16(planted)) < rel(int8(planted), fp16(planted)) / 3   # int8 weights


@pytest.mark.parametrize("shape", [(48, 100), (200, 144), (64, 576)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_kernels_agree_with_each_other_and_bitsandbytes(shape, calibrated):
    W, p, x = layer(*shape, seed=2)
    x = x[:5]
    x[:, 7] *= 30
    if calibrated:      # a stored fp16 column (3) that is not an outlier in this batch, one that is
        p = make_llm_int8(W, 6.0, torch.tensor([3, 7]))
        assert torch.equal(p.dequantize()[:, [3, 7]], W[:, [3, 7]].half().float())
    bias = torch.randn(shape[0])
    emulated = KERNELS["llm_int8_emulated"].prepare(p, bias)(x)
    assert rel(KERNELS["cpu_llm_int8"].prepare(p, bias)(x), emulated) < 1e-6
    assert rel(KERNELS["bnb_int8"].prepare(p, bias)(x), emulated) < 1e-2    # bnb quantizes in fp16
    assert rel(emulated, x @ p.dequantize().T + bias) < 2e-2                # activation rounding only
    assert KERNELS["cpu_llm_int8"].prepare(p, bias)(x.bfloat16()).dtype == torch.bfloat16
    assert select(p, "cpu").name == "cpu_llm_int8" and select(p, "cuda").name == "bnb_int8"


def test_format_round_trip_and_compressor_widths():
    W, p, _ = layer(seed=3)
    q = torch.round(127 * W / W.abs().amax(1, keepdim=True))
    assert torch.equal(p.tensors["qweight"].float(), q)
    assert torch.equal(p.dequantize(), q * (W.abs().amax(1, keepdim=True) / 127))
    assert llm_int8(W, None, QSpec(bits=8)).format == "llm-int8"
    with pytest.raises(ValueError, match="needs calibration"):
        llm_int8(W, None, QSpec(bits=4))


def test_save_load_equals_in_memory_model(tmp_path):
    model = tiny_model("llama")
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    packed, _ = compress_model(model, token_batches(), plan_for(model, QSpec(bits=8)), llm_int8,
                               torch.device("cpu"), progress=False)
    assert {p.format for p in packed.values()} == {"llm-int8"}
    fake = outputs(model, ids)
    with atomic_dir(tmp_path / "q") as d:
        save_packed(d, model, packed, {})
    assert torch.equal(outputs(quantkit.load(tmp_path / "q", kernel="reference"), ids), fake)
    served = quantkit.load(tmp_path / "q")          # LLM.int8 arithmetic: activations in int8 too
    assert 0 < rel(outputs(served, ids), fake) < 2e-2


def test_bnb_export_loads_in_transformers_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from quantkit.formats.export import export
    model = tiny_model("llama")
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    packed, _ = compress_model(model, None, plan_for(model, QSpec(bits=8)), llm_int8,
                               torch.device("cpu"), progress=False)   # no calibration: no fp16 columns
    with atomic_dir(tmp_path / "q") as d:
        save_packed(d, model, packed, {})
    res = export(tmp_path / "q", tmp_path / "bnb", "bnb-int8")
    assert res["layers"] == 14 and "note" not in res
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    ours = quantkit.load(tmp_path / "q", kernel="bnb_int8")
    name = "model.layers.1.mlp.down_proj"
    x = torch.randn(5, theirs.get_submodule(name).in_features)
    assert rel(theirs.get_submodule(name)(x), ours.get_submodule(name)(x)) < 1e-3   # same layer maths
    a, b = outputs(theirs, ids), outputs(ours, ids)
    assert rel(a, b) < 1e-2
    assert rel(a, outputs(quantkit.load(tmp_path / "q"), ids)) < 1e-2       # our int8 kernel too
    from tests.test_serve import save_quantized
    save_quantized("llama", tmp_path / "int")
    with pytest.raises(QuantkitError, match="bnb-int8 holds LLM.int8 layers only"):
        export(tmp_path / "int", tmp_path / "x", "bnb-int8")


def reference_llm_int8(x, W, threshold, stored):
    """The decomposition written out: O = calibration's columns ∪ this batch's |x| >= threshold;
    the rest of x by vector-wise int8 against the int8 weight codes; x[:, O] in 16 bits against
    the fp16 weights of the stored columns and the dequantized int8 weights of new ones."""
    absmax = W.abs().amax(1)
    codes = torch.round(W * 127 / absmax[:, None])
    w16 = codes * absmax[:, None] / 127
    w16[:, stored] = W[:, stored].half().float()
    new = [j for j in range(W.shape[1]) if bool((x[:, j].abs() >= threshold).any())]
    O = sorted(set(stored) | set(new))
    rest = x.clone()
    rest[:, O] = 0
    cx = rest.abs().amax(1, keepdim=True)
    y = (torch.round(127 * rest / cx).double() @ codes.double().T).float() * (cx * absmax[None]) / 127**2
    return y + x[:, O] @ w16[:, O].T


@pytest.mark.parametrize("name", ["cpu_llm_int8", "llm_int8_emulated"])
def test_outlier_set_is_the_threshold_crossers_plus_calibrations_columns(name):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g) * 0.05
    x = torch.randn(8, 64, generator=g) * 0.3
    x[2, 40] = 2.9      # just under the threshold: stays in int8
    x[5, 10] = -3.5     # over it, and not a calibration column: a new outlier this batch
    x[1, 50] = 3.2      # over it, a calibration column (fp16 weights)
    p = make_llm_int8(W, 3.0, torch.tensor([50]))
    run = KERNELS[name].prepare(p, None)
    assert rel(run(x), reference_llm_int8(x, W, 3.0, [50])) < 1e-6
    x[5, 10] = 0.1      # only the calibration column crosses now
    assert rel(run(x), reference_llm_int8(x, W, 3.0, [50])) < 1e-6


def test_compressor_keeps_calibrations_threshold_crossers_up_to_one_percent():
    W = torch.randn(16, 300) * 0.05
    absmax = torch.full((300,), 0.5)
    absmax[[7, 100, 201]] = torch.tensor([2.5, 9.0, 3.0])   # 3.0 crosses 3.0; 2.5 does not
    stats = LayerStats(H=torch.eye(300), n=1, act_absmax=absmax)
    p = llm_int8(W, stats, QSpec(bits=8), threshold=3.0)
    assert p.meta["threshold"] == 3.0
    assert p.tensors["outlier_cols"].tolist() == [100, 201]
    assert torch.equal(p.tensors["outlier_weight"], W[:, [100, 201]].half())
    absmax[[50, 60, 70]] = 4.0                               # five crossers, room for 300 // 100 = 3
    p = llm_int8(W, stats, QSpec(bits=8), threshold=3.0)
    assert len(p.tensors["outlier_cols"]) == 3 and 100 in p.tensors["outlier_cols"].tolist()
