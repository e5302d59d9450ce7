"""Image models through the public API and the CLI: quantize (module, checkpoint dir, synthetic
or given images), mixed precision priced by KL, save and load back, eval on an image folder."""
import json

import pytest
import torch
from PIL import Image

import cli
import quantkit
from quantkit.errors import QuantkitError
from tests.test_convnet import resnet, smooth


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("resnet")
    m = resnet(channels=3, size=16)
    m.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                            "image_std": [0.25] * 3}))
    return d


def test_quantize_a_module_with_given_images():
    m = resnet()
    x = smooth(32, seed=1)
    ref = resnet()(x).logits.detach()
    rep = quantkit.quantize(m, calib=x, bits=4, act_bits=8, method="gptq", progress=False)
    assert rep.model is m and rep.n_layers == 7 and rep.act_bits == 8
    # 4-bit middle layers, 8-bit first and last, plus a 16-bit scale and 4/8-bit zero per row
    assert 4 < rep.bits_per_weight < 8
    err = float((m(x).logits - ref).pow(2).mean() / ref.pow(2).mean())
    assert err < 0.05


def test_saved_checkpoint_loads_back_to_the_same_outputs(checkpoint, tmp_path):
    out = tmp_path / "q"
    rep = quantkit.quantize(str(checkpoint), calib="zeroq", bits=4, act_bits=4, method="rtn",
                            progress=False, out=str(out), seed=3,
                            **{"calib.n_samples": 8, "calib.batch_size": 8, "zeroq.iterations": 5,
                               "zeroq.batch_size": 8})
    assert rep.calib == "zeroq" and rep.size_bytes > 0 and (out / "quantkit_image.json").is_file()
    loaded = quantkit.load(str(out), kernel="reference")     # the fake-quant arithmetic of the run
    x = smooth(4, 3, 16, seed=2)
    assert torch.equal(loaded(x).logits, rep.model(x).logits)
    meta = json.loads((out / "quantkit_image.json").read_text())
    assert meta["run"]["settings"]["seed"] == 3 and meta["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("alloc", ["pareto", "ip"])
def test_mixed_precision_prices_layers_by_kl_and_meets_the_budget(alloc):
    from quantkit.image import kl_table
    from quantkit.model.convnet import fold_batchnorm, trace
    m = resnet()
    x = smooth(32, seed=4)
    tr = trace(m, x[:2])
    fold_batchnorm(m, tr)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    table = kl_table(m, tr.order[1:-1], [2, 4, 8], x)
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())   # weights restored
    assert (table.cost[:, 0] > table.cost[:, 1]).all() and (table.cost[:, 1] > table.cost[:, 2]).all()
    assert (table.cost >= 0).all()
    rep = quantkit.quantize(resnet(), calib=x, bits=3, act_bits=None, method="rtn", alloc=alloc,
                            sensitivity="kl", bit_options=[2, 4, 8], progress=False)
    bits = rep.settings["layer_bits"]
    sizes = {n: table.weights[i] for i, n in enumerate(table.layers)}
    assert set(bits) == set(table.layers) and set(bits.values()) <= {2, 4, 8}
    assert sum(sizes[n] * b for n, b in bits.items()) <= 3 * sum(sizes.values())
    assert len(set(bits.values())) > 1                          # a real mix, not one width


def test_layer_macs_equal_torchs_flop_count():
    from torch.utils.flop_counter import FlopCounterMode
    from quantkit.image import layer_macs
    from quantkit.model.convnet import trace
    m = resnet()
    x = smooth(1, seed=5)
    order = trace(m, x).order
    with FlopCounterMode(display=False) as fc:
        m(x)
    flops = fc.get_flop_counts()
    want = {n: sum(flops[f"{type(m).__name__}.{n}"].values()) // 2 for n in order}  # a MAC: 2 flops
    assert layer_macs(m, order, x) == want and all(v > 0 for v in want.values())


def test_ip_under_a_bops_budget_is_the_optimum_of_both_constraints():
    """Σ MACs x weight bits x input bits within --max-bops as well as the size budget: the ip
    choice equals brute force over every assignment, and the BOPs budget binds."""
    import itertools
    from quantkit.alloc.ip import ip_allocate
    from quantkit.image import bops_constraint, kl_table, layer_macs
    from quantkit.model.convnet import fold_batchnorm, trace
    from quantkit.quant.convnet import default_plan
    m = resnet()
    x = smooth(32, seed=4)
    tr = trace(m, x[:2])
    fold_batchnorm(m, tr)
    first = tr.readers(tr.order[1])                   # read the first layer's output: 8-bit inputs
    plan = default_plan(tr.order, 8, 6, first_output=first)
    ib = {n: 8 if n in first else 6 for n in tr.order}
    table = kl_table(m, tr.order[1:-1], [2, 4, 8], x)
    macs = layer_macs(m, tr.order, x)
    edges = sum(macs[n] * 8 * (32 if i == 0 else 8) for i, n in enumerate((tr.order[0], tr.order[-1])))
    mid = [macs[n] * ib[n] for n in table.layers]                    # per weight bit

    def best(budget_g):
        feasible = [c for c in itertools.product(range(3), repeat=len(mid))
                    if sum(table.size[i, o] for i, o in enumerate(c)) <= table.budget_bits(6) + 1e-6
                    and edges + sum(mid[i] * (2, 4, 8)[o] for i, o in enumerate(c)) <= budget_g * 1e9]
        return min(feasible, key=lambda c: sum(float(table.cost[i, o]) for i, o in enumerate(c)))

    free = best(1e9)
    free_bops = (edges + sum(mid[i] * (2, 4, 8)[o] for i, o in enumerate(free))) / 1e9
    lo = (edges + sum(mid) * 2) / 1e9                                # every middle layer at 2 bits
    tight = (lo + free_bops) / 2
    extra = bops_constraint(m, tr.order, plan, table, x[:1], tight)
    got = ip_allocate(table, 6, **extra)
    want = best(tight)
    assert want != free                                              # the BOPs budget binds
    assert sum(float(table.cost[i, o]) for i, o in enumerate(got.tolist())) == \
        pytest.approx(sum(float(table.cost[i, o]) for i, o in enumerate(want)), rel=1e-9)
    with pytest.raises(QuantkitError, match=r"--max-bops 1e-06 is infeasible: .* needs [0-9.e-]+ to"):
        bops_constraint(m, tr.order, plan, table, x[:1], 1e-6)
    rep = quantkit.quantize(resnet(), calib=x, bits=6, act_bits=6, method="rtn", alloc="ip",
                            sensitivity="kl", bit_options=[2, 4, 8], max_bops=tight, progress=False)
    chosen = rep.settings["layer_bits"]
    spent = edges + sum(macs[n] * ib[n] * b for n, b in chosen.items())
    assert spent <= tight * 1e9 and rep.settings["gbops"] == pytest.approx(spent / 1e9, rel=1e-12)
    with pytest.raises(QuantkitError, match="--max-bops needs --alloc ip"):
        quantkit.quantize(resnet(), calib=x, bits=6, act_bits=6, method="rtn", alloc="pareto",
                          sensitivity="kl", max_bops=1.0, progress=False)
    with pytest.raises(QuantkitError, match="--max-bops: a compute budget is for image models"):
        quantkit.quantize("llama", max_bops=1.0, progress=False)


def test_image_errors_are_one_line_and_name_the_fix(checkpoint, tmp_path):
    with pytest.raises(QuantkitError, match="--act-bits: the language-model methods are weight-only"):
        quantkit.quantize("llama", act_bits=8, progress=False)
    for flag in ("bias_correction", "bn_reestimate"):
        with pytest.raises(QuantkitError, match=f"--{flag.replace('_', '-')} .*image models"):
            quantkit.quantize("llama", **{flag: True}, progress=False)
    with pytest.raises(QuantkitError, match="fractional budget"):
        quantkit.quantize(resnet(), calib=smooth(8), bits=3.5, progress=False)
    from evals.images import imagefolder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantkitError, match="no image"):
        imagefolder(str(empty))


def test_cli_quantizes_and_evaluates_on_an_image_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    out = tmp_path / "q8"
    rc = cli.main(["quantize", str(checkpoint), "--calib", f"imagefolder:{folder}", "--bits", "8",
                   "--act-bits", "8", "--method", "rtn", "--n-samples", "6", "--out", str(out)])
    assert rc == 0 and (out / "quantized.safetensors").is_file()
    j = tmp_path / "eval.json"
    rc = cli.main(["eval", str(out), "--dataset", f"imagefolder:{folder}", "--json", str(j)])
    res = json.loads(j.read_text())
    assert rc == 0 and res["images"] == 6
    assert res["agreement_top1"] >= 0.5 and 0 <= res["kl"] < 0.05
    assert "agreement_top1" in capsys.readouterr().out


@pytest.mark.parametrize("signed,rows", [(False, 40), (True, 40), (False, 5)])
def test_int8_matmul_is_exact_integer_arithmetic(signed, rows):
    from quantkit.formats.packed import make_int
    from quantkit.kernels.int8_act import Int8Matmul
    g = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 256, (16, 24), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 256, (16, 1), generator=g)
    scales = torch.rand(16, 1, generator=g) + 0.1
    p = make_int(codes, scales, zeros, 8, -1)
    lo, hi = (-128, 127) if signed else (0, 255)
    a = torch.randint(lo, hi + 1, (rows, 24), generator=g).float()
    s_x = torch.tensor(0.05)
    y = Int8Matmul(p)(a, s_x, signed)
    ref = (a.double() @ (codes.double() - zeros.double()).t()) * (0.05 * scales.half().double().t())
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-4)


def test_w8a8_checkpoint_runs_on_the_int8_kernel(checkpoint, tmp_path):
    out = tmp_path / "w8a8"
    quantkit.quantize(str(checkpoint), calib=smooth(32, 3, 16, seed=6), bits=8, act_bits=8,
                      method="rtn", progress=False, out=str(out))
    fast = quantkit.load(str(out))
    ref = quantkit.load(str(out), kernel="reference")
    on_int8 = [n for n, m in fast.named_modules() if "forward" in m.__dict__]
    assert len(on_int8) >= 3                   # every groups=1 conv and the head, but the stem (fp input)
    x = smooth(8, 3, 16, seed=7)
    torch.testing.assert_close(fast(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
