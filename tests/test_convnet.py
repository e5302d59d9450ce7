"""Image classifiers: discovery, BN folding, conv GPTQ, activation quantization, distillation
(ZeroQ, Genie-D, swing conv) and Genie-M, on tiny HF models built here."""
import copy
from dataclasses import replace
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from quantkit import registry
from quantkit.calib.bnstats import BNStatLoss, SwingConvs, swing
from quantkit.calib.synthetic import distill
from quantkit.errors import QuantkitError
from quantkit.formats.packed import int_parts, make_int
from quantkit.image import quantize_image_model
from quantkit.model.convnet import batchnorms, fold_batchnorm, trace, unfold_input, unit_layers, units
from quantkit.quant.act import ActQuantizer, attach_input_quantizers, fake_quant, mse_scale, qrange
from quantkit.quant.convnet import compress_layer, default_plan, layer_hessians, quantize_convnet
from quantkit.quant.genie_m import (GenieMConfig, SoftWeight, _split, capture, genie_m, init_scale,
                                   output_error, reconstruct_unit)
from quantkit.stats.hessian import proxy_loss
from quantkit.types import QSpec


def smooth(n, c=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g).cumsum(-1).cumsum(-2) / size


def resnet(channels=1, depths=(1, 1), size=16, seed=0):
    """A tiny HF ResNet whose BN running statistics are those of smooth random images."""
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16],
                                    depths=list(depths), layer_type="basic", num_labels=10,
                                    image_size=size)
    m = transformers.ResNetForImageClassification(cfg).train()
    with torch.no_grad():
        for i in range(30):
            m(smooth(32, channels, size, seed=100 + i))
    return m.eval()


def mobilenet():
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.35,
                                         num_labels=10)
    m = transformers.MobileNetV2ForImageClassification(cfg).train()
    with torch.no_grad():
        for i in range(10):
            m(smooth(16, 3, 16, seed=i))
    return m.eval()


def test_trace_pairs_every_conv_with_its_bn_and_folding_is_exact():
    m = resnet(depths=(2, 1))
    x = smooth(4, seed=9)
    tr = trace(m, x)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert sorted(tr.bn_of) == sorted(convs)            # every HF ResNet conv feeds a BN
    assert all(b.endswith("normalization") for b in tr.bn_of.values())
    assert tr.order[-1] == "classifier.1" and tr.order[0] == "resnet.embedder.embedder.convolution"
    ref = m(x).logits
    folded = fold_batchnorm(m, tr)
    assert len(folded) == len(convs) and not batchnorms(m)
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_units_are_blocks_in_order_and_cover_every_layer_once():
    m = resnet(depths=(2, 2))
    tr = trace(m, smooth(2))
    us = units(m, tr.order)
    assert us == ["resnet.embedder", "resnet.encoder.stages.0.layers.0",
                  "resnet.encoder.stages.0.layers.1", "resnet.encoder.stages.1.layers.0",
                  "resnet.encoder.stages.1.layers.1", "classifier"]
    covered = [n for u in us for n in unit_layers(u, tr.order)]
    assert sorted(covered) == sorted(tr.order) and len(covered) == len(set(covered))


def test_mobilenet_v2_tf_padding_and_depthwise_convs_survive_quantization():
    m = mobilenet()
    x = smooth(4, 3, 16, seed=3)
    ref = m(x).logits.detach()
    tr = trace(m, x)
    assert any(m.get_submodule(n).groups > 1 for n in tr.order)        # depthwise found
    fold_batchnorm(m, tr)
    hooked = copy.deepcopy(m)
    attach_input_quantizers(hooked, {n: 8 for n in tr.order})        # not calibrated: identity
    assert all(isinstance(hooked.get_submodule(n), nn.Conv2d) for n in tr.order[:-1])
    torch.testing.assert_close(hooked(x).logits, m(x).logits)
    # A random-init MobileNetV2 is chaotic end to end (1e-3 relative weight noise moves the
    # logits by 2%, and the amount depends on the thread count), so the check is per layer:
    # every quantized layer, on the (quantized) input it really gets, against its fp weights.
    errs = {}
    for bits in (8, 4):
        q = copy.deepcopy(m)
        plan = default_plan(tr.order, bits, bits, edge_bits=bits)
        plan.units = units(q, tr.order)
        quantize_convnet(q, plan, registry.get("compressor", "gptq"), [smooth(16, 3, 16, seed=5)], False)
        seen = {}

        def grab(mod, args, out):
            seen[names[mod]] = (args[0].detach(), out.detach())
        names = {q.get_submodule(n): n for n in tr.order}
        hooks = [mod.register_forward_hook(grab) for mod in names]
        assert q(x).logits.shape == ref.shape
        for h in hooks:
            h.remove()
        rel = []
        for n in tr.order:
            fp, inp, out = m.get_submodule(n), *seen[n]
            want = (fp._conv_forward(inp, fp.weight, fp.bias) if isinstance(fp, nn.Conv2d)
                    else F.linear(inp, fp.weight, fp.bias)).detach()
            rel.append(float((out - want).pow(2).sum() / want.pow(2).sum()))
        errs[bits] = sorted(rel)[len(rel) // 2]            # median: a few near-dead layers stray
        assert max(rel) < 0.1, (bits, rel)
    assert errs[8] < 2e-4 and errs[4] > 30 * errs[8], errs    # 16x finer grid, ~256x less error


def test_w8a8_is_near_lossless_and_w4a4_is_not_on_a_resnet():
    m = resnet()
    x = smooth(16, seed=3)
    tr = trace(m, x)
    fold_batchnorm(m, tr)
    ref = m(x).logits.detach()
    errs = {}
    for bits in (8, 4):
        q = copy.deepcopy(m)
        plan = default_plan(tr.order, bits, bits, edge_bits=bits)
        plan.units = units(q, tr.order)
        _, quantizers = quantize_convnet(q, plan, registry.get("compressor", "rtn"), [smooth(64, seed=5)], False)
        assert all(qz.enabled for qz in quantizers.values()) and len(quantizers) == len(tr.order) - 1
        errs[bits] = float((q(x).logits - ref).pow(2).mean() / ref.pow(2).mean())
    assert errs[8] < 1e-3 < 1e-2 < errs[4]


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_unfolded_inputs_reproduce_the_conv(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 8, 9, 9)
    cols = unfold_input(conv, x)                          # [groups, positions, k]
    W = conv.weight.reshape(groups, 16 // groups, -1)
    y = torch.einsum("gok,gpk->gpo", W, cols)             # positions are (batch, y, x)
    ref = (conv(x) - conv.bias.view(1, -1, 1, 1)).reshape(2, groups, 16 // groups, -1)
    torch.testing.assert_close(y.reshape(groups, 2, -1, 16 // groups).permute(1, 0, 3, 2),
                               ref, rtol=1e-4, atol=1e-5)


def test_grouped_conv_gptq_uses_each_groups_hessian_and_beats_rtn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4))
    batches = [smooth(32, 4, 8, seed=1)]
    stats = layer_hessians(model, ["2"], batches)["2"]
    assert len(stats) == 4 and stats[0].H.shape == (18, 18)
    spec = QSpec(bits=3, group_size=-1, act_order=True, mse=False)
    W = model[2].weight.detach().reshape(8, -1).clone()
    losses = {}
    for name in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        p = compress_layer(m[2], registry.get("compressor", name), stats, spec)
        assert p.shape == (8, 18)
        Q = p.dequantize()
        torch.testing.assert_close(m[2].weight.reshape(8, -1), Q)
        losses[name] = [proxy_loss(W[2 * g:2 * g + 2] - Q[2 * g:2 * g + 2], stats[g].H) for g in range(4)]
        for g in range(4):                       # each group is its own problem, on its own H
            alone = registry.get("compressor", name)(W[2 * g:2 * g + 2], stats[g], spec)
            torch.testing.assert_close(Q[2 * g:2 * g + 2], alone.dequantize())
    assert sum(losses["gptq"]) < 0.9 * sum(losses["rtn"])
    # each group's Hessian is the mean outer product of its own 2 input channels' 3x3 patches
    x = torch.relu(model[0](batches[0]))
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 4, 18)
    for g in range(4):
        torch.testing.assert_close(stats[g].H, patches[:, g].T @ patches[:, g] / len(patches),
                                   rtol=1e-4, atol=1e-6)


def test_activation_codes_are_integers_in_range_and_unsigned_after_relu():
    x = torch.relu(torch.randn(10000))
    q = ActQuantizer(4)
    q.calibrate(x)
    assert not q.signed
    codes = (q(x) / q.scale).round()
    assert torch.equal(q(x), codes * q.scale) and codes.min() >= 0 and codes.max() <= 15
    s = mse_scale(x, 4, False)
    assert float((x - fake_quant(x, s, 4, False)).pow(2).mean()) <= \
        float((x - fake_quant(x, x.max() / 15, 4, False)).pow(2).mean())
    assert qrange(4, True) == (-8, 7) and qrange(8, False) == (0, 255)


def test_simulated_w8a8_conv_is_integer_arithmetic():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.relu(torch.randn(2, 3, 6, 6))
    p = compress_layer(conv, registry.get("compressor", "rtn"), None, QSpec(8, -1, act_order=False, mse=False))
    codes, scales, zeros = p.tensors["qweight"], p.tensors["scales"].float(), None
    del codes, zeros
    s_x = mse_scale(x, 8, False)
    xq = fake_quant(x, s_x, 8, False)
    y = conv(xq)
    # the same through integers: x = s_x·ix, w = s_w·(iw − z) per output channel
    W = conv.weight.detach().reshape(4, -1).double()
    iw_minus_z = (W / scales.double()).round()
    assert torch.allclose(iw_minus_z * scales.double(), W, atol=1e-9)
    ix = (xq.double() / s_x.double()).round()
    yi = F.conv2d(ix, iw_minus_z.reshape(conv.weight.shape)) * (s_x.double() * scales.double().view(1, -1, 1, 1))
    torch.testing.assert_close(y.double(), yi, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["zeroq", "genie"])
def test_distillation_lowers_the_bn_statistics_loss_tenfold(method):
    m = resnet()
    hist = []
    opts = dict(iterations=150, batch_size=16) if method == "zeroq" else \
        dict(iterations=150, batch_size=16, width=16)
    x = distill(m, method, n=16, seed=0, progress=False, history=hist, **opts)
    assert x.shape == (16, 1, 16, 16) and torch.isfinite(x).all()
    first, last = hist[0]
    assert last * 10 <= first
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())   # model untouched
    assert not m.training


def test_swing_preserves_shapes_and_is_the_plain_conv_at_zero_offset():
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(swing(x, 0, 0), x)
    assert swing(x, 1, -1).shape == x.shape
    # a shift by one: interior pixels move, the border is reflected
    assert torch.equal(swing(x, 1, 0)[..., :-1, :], x[..., 1:, :])
    assert torch.equal(swing(x, -1, 0)[..., 0, :], x[..., 1, :])
    m = resnet()
    ref = m(smooth(2)).logits
    with SwingConvs(m, torch.Generator().manual_seed(0)) as s:
        assert s.convs and all(max(c.stride) > 1 for c in s.convs)
    torch.testing.assert_close(m(smooth(2)).logits, ref)      # hooks gone after the context


def test_default_plan_keeps_the_first_layers_output_and_the_last_layer_at_8_bits():
    m = resnet(depths=(2, 1))
    tr = trace(m, smooth(2))
    first = tr.readers(tr.order[1])
    assert first == [tr.order[1]]                 # stage 0 has no shortcut conv: one reader
    plan = default_plan(tr.order, 4, 4, first_output=first)
    assert plan.acts[tr.order[0]] is None and plan.acts[tr.order[1]] == 8 and plan.acts[tr.order[-1]] == 8
    assert all(plan.acts[n] == 4 for n in tr.order[2:-1])
    assert [plan.weights[n].bits for n in tr.order] == [8] + [4] * (len(tr.order) - 2) + [8]
    # a stage-1 block reads one tensor in two convs (shortcut and main path): both are readers
    sc = next(n for n in tr.order if "shortcut" in n)
    block = sc.rsplit(".shortcut", 1)[0]
    assert tr.readers(sc) == [n for n in tr.order if n.startswith(block) and n.endswith(("layer.0.convolution", "shortcut.convolution"))]
    assert default_plan(tr.order, 4, None).acts == {n: None for n in tr.order}


def test_genie_m_codes_are_integers_within_one_step_of_rtn():
    torch.manual_seed(0)
    W = torch.randn(6, 3, 3, 3)
    sw = SoftWeight(W, 4, 2.4)
    with torch.no_grad():
        sw.V.normal_(0, 3)                       # any soft state: hard codes stay legal
        sw.log_step.add_(math.log(1.1))
    p = sw.packed()
    codes = sw.codes(True)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15
    s0, z = init_scale(W.reshape(6, -1), 4, 2.4)
    rtn = torch.clamp(torch.round(W.reshape(6, -1) / s0[:, None]) + z[:, None], 0, 15)
    assert (codes - rtn).abs().max() <= 1
    # hard rounding goes up exactly where the soft rounding is past one half
    up = (sw.h() >= 0.5).float()
    assert torch.equal(codes, torch.clamp(sw.base + up + sw.zero, 0, 15)) and 0 < up.mean() < 1
    torch.testing.assert_close(p.dequantize(), (codes - sw.zero) * sw.scale.detach().half().float())


def test_genie_m_start_from_another_rounding_keeps_its_grid_and_sides():
    torch.manual_seed(3)
    W = torch.randn(5, 18)
    s0, z = init_scale(W, 3, 2.4)
    rtn = torch.clamp(torch.round(W / s0[:, None]) + z[:, None], 0, 7)
    moved = torch.randint(-2, 3, W.shape) * (torch.rand(W.shape) < 0.3)    # GPTQ-like moves
    start = make_int(torch.clamp(rtn + moved, 0, 7).to(torch.int32), s0[:, None], z[:, None], 3, -1)
    codes0, scale0, zero0, _ = int_parts(start)
    sw = SoftWeight(W, 3, 2.4, start)
    torch.testing.assert_close(sw.scale.detach(), scale0)
    assert torch.equal(sw.zero, zero0)
    step = codes0 - zero0 - sw.base                                   # the start's move off the floor
    inside = (step == 0) | (step == 1)
    assert 0.6 < inside.float().mean() < 1
    hard = sw.codes(True)
    assert torch.equal(hard[inside], codes0[inside])                  # its codes where reachable
    assert torch.equal(hard[~inside], torch.clamp(sw.base + (step >= 1).float() + sw.zero, 0, 7)[~inside])
    frac = W / scale0 - sw.base                                        # as far from 1/2 as the weight
    keep = (frac - 0.5).abs().clamp(max=0.5 - 1e-3)
    torch.testing.assert_close((sw.h() - 0.5).abs().clamp(max=0.5 - 1e-3), keep, atol=1e-4, rtol=0)


def test_genie_m_gptq_start_gives_gptq_codes_in_the_first_unit():
    m = resnet()
    x = smooth(48, seed=7)
    tr = trace(m, x[:2])
    fold_batchnorm(m, tr)
    plan = default_plan(tr.order, 3, 4)
    plan.units = units(m, tr.order)
    g = copy.deepcopy(m)
    ref, _ = quantize_convnet(g, plan, registry.get("compressor", "gptq"), [x], progress=False)
    w = copy.deepcopy(m)
    packed, _, info = genie_m(w, plan, [x], GenieMConfig(iterations=0, start="gptq"), progress=False)
    assert info == {"kept_iteration": {u: 0 for u in plan.units}}
    first = [n for n in unit_layers(plan.units[0], plan.order) if n in plan.weights]
    assert first
    for n in first:
        cg, sg, zg, _ = int_parts(ref[n])
        cw, sw_, zw, _ = int_parts(packed[n])
        assert torch.equal(sg, sw_) and torch.equal(zg, zw)
        base = torch.floor(m.get_submodule(n).weight.reshape(cg.shape[0], -1) / sg)
        inside = ((cg - zg - base) >= 0) & ((cg - zg - base) <= 1)
        assert 0.9 < inside.float().mean() < 1 and torch.equal(cw[inside], cg[inside])
        assert torch.equal(cw - zw - base >= 1, cg - zg - base >= 1)    # elsewhere its side, clipped
        assert ((cw - zw - base) >= 0).all() and ((cw - zw - base) <= 1).all()
    torch.manual_seed(0)
    trained = copy.deepcopy(m)
    genie_m(trained, plan, [x], GenieMConfig(iterations=300, lr_round=1e-2, start="gptq"),
            progress=False)                                     # 0.75-0.80 of the start, 1 or 2 threads
    fp_logits = m(x).logits                                      # m is BN-folded, unquantized
    err = {k: float((v(x).logits - fp_logits).pow(2).mean()) for k, v in (("start", w), ("trained", trained))}
    assert err["trained"] < 0.9 * err["start"]                  # reconstruction improves on GPTQ
    with pytest.raises(QuantkitError, match=r"start 'adaround': use nearest \| gptq"):
        genie_m(copy.deepcopy(m), plan, [x], GenieMConfig(iterations=0, start="adaround"), progress=False)
    for bad in ({"holdout": 1.0}, {"holdout": -0.1}, {"check_every": 0}):
        with pytest.raises(QuantkitError, match=r"holdout is a share in \[0, 1\)"):
            genie_m(copy.deepcopy(m), plan, [x], GenieMConfig(iterations=1, **bad), progress=False)


def test_genie_m_weight_step_moves_by_the_same_ratio_at_every_bit_width():
    torch.manual_seed(2)
    W = torch.randn(4, 12)
    moved = {}
    for bits in (4, 8):
        sw = SoftWeight(W, bits, 2.4)
        s0, _ = init_scale(W, bits, 2.4)
        torch.testing.assert_close(sw.scale.detach(), s0[:, None], rtol=0, atol=0)   # s₀ at init
        opt = torch.optim.Adam([sw.log_step], lr=0.01)
        for _ in range(5):                       # push every step up: Adam moves u by lr a step
            opt.zero_grad()
            (-sw().pow(2).sum()).backward()
            opt.step()
        moved[bits] = (sw.scale / s0[:, None]).detach()
    for bits, ratio in moved.items():
        torch.testing.assert_close(ratio, torch.full_like(ratio, math.exp(0.05)), rtol=1e-3, atol=0)


def test_genie_m_split_keeps_the_share_out_and_nothing_when_untrained():
    g = torch.Generator().manual_seed(0)
    train, held = _split(32, 0.25, 100, g)
    assert len(held) == 8 and sorted(torch.cat([train, held]).tolist()) == list(range(32))
    assert _split(32, 0.25, 0, g)[1].numel() == 0 and len(_split(32, 0.25, 0, g)[0]) == 32
    assert [len(t) for t in _split(3, 0.9, 10, g)] == [2, 1]     # at least two left to train on
    assert [len(t) for t in _split(1, 0.5, 10, g)] == [1, 0]


def _unit_problem(seed=0, n=24):
    torch.manual_seed(seed)
    unit = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x_fp = smooth(n, 4, 8, seed=seed)
    with torch.no_grad():
        y = unit(x_fp)
    x_q = x_fp + 0.05 * torch.randn_like(x_fp)
    layers = {"0": unit[0], "2": unit[2]}
    return unit, layers, x_q, x_fp, y


def _held_error(unit, x, y):
    with torch.no_grad():
        return float((unit(x) - y).pow(2).sum(1).mean())


def test_genie_m_output_error_is_the_same_in_any_chunks():
    unit, _, x_q, _, y = _unit_problem(n=10)
    whole = _held_error(unit, x_q, y)
    for chunk in (1, 3, 4, 10, 32):
        assert output_error(unit, x_q, y, chunk) == pytest.approx(whole, rel=1e-5)


def test_genie_m_keeps_the_state_best_on_held_out_images_and_never_trains_on_them():
    cfg = GenieMConfig(iterations=60, lr_round=0.05, holdout=0.25, check_every=10, start="nearest")
    unit, layers, x_q, x_fp, y = _unit_problem()
    _, held = _split(len(x_q), cfg.holdout, cfg.iterations, torch.Generator().manual_seed(5))
    packed, kept = reconstruct_unit(unit, layers, {"0": 3, "2": 3}, [], x_q, x_fp, y, cfg,
                                    torch.Generator().manual_seed(5))
    trained = _held_error(unit, x_q[held], y[held])
    unit0, layers0, *_ = _unit_problem()
    _, kept0 = reconstruct_unit(unit0, layers0, {"0": 3, "2": 3}, [], x_q, x_fp, y,
                                replace(cfg, iterations=0), torch.Generator().manual_seed(5))
    start = _held_error(unit0, x_q[held], y[held])
    assert kept0 == 0 and kept % 10 == 0 and 0 < kept <= 60 and trained < start
    # a run that only gets worse (huge steps) keeps its start: the same codes as no training at all
    unit1, layers1, *_ = _unit_problem()
    bad, kept1 = reconstruct_unit(unit1, layers1, {"0": 3, "2": 3}, [], x_q, x_fp, y,
                                  replace(cfg, lr_round=50.0, lr_log_step=5.0),
                                  torch.Generator().manual_seed(5))
    start_packed = {n: SoftWeight(m.weight.detach(), 3, cfg.scale_p).packed()
                    for n, m in _unit_problem()[1].items()}
    assert kept1 == 0
    for n in bad:
        assert all(torch.equal(a, b) for a, b in zip(int_parts(bad[n])[:3], int_parts(start_packed[n])[:3]))
    # the held-out targets never reach a gradient: NaN there leaves the trained weights finite
    unit2, layers2, *_ = _unit_problem()
    y_nan = y.clone()
    y_nan[held] = float("nan")
    out, _ = reconstruct_unit(unit2, layers2, {"0": 3, "2": 3}, [], x_q, x_fp, y_nan, cfg,
                              torch.Generator().manual_seed(5))
    assert all(torch.isfinite(p.dequantize()).all() for p in out.values())


def test_image_run_records_the_iteration_each_genie_m_unit_kept():
    x = smooth(24, seed=7)
    rep = quantize_image_model(resnet(), x, bits=4, act_bits=4, method="genie-m", progress=False,
                               method_options={"iterations": 20, "check_every": 5})
    kept = rep.settings["method_info"]["kept_iteration"]
    tr = trace(resnet(), x[:2])
    assert list(kept) == units(resnet(), tr.order)
    assert all(v in (0, 5, 10, 15, 20) for v in kept.values())
    assert quantize_image_model(resnet(), x, bits=4, method="rtn",
                                progress=False).settings["method_info"] == {}


def test_init_scale_is_the_grid_optimum():
    torch.manual_seed(1)
    W = torch.randn(3, 20)
    s, z = init_scale(W, 3, 2.4)
    for r in range(3):
        def err(s_, z_):
            return float((W[r] - (torch.clamp(torch.round(W[r] / s_) + z_, 0, 7) - z_) * s_).abs().pow(2.4).sum())
        lo, hi = min(float(W[r].min()), 0), max(float(W[r].max()), 0)
        grid = [((hi - lo) * c / 7, round(-lo * c / ((hi - lo) * c / 7))) for c in torch.linspace(1, 0.2, 100).tolist()]
        assert err(float(s[r]), float(z[r])) <= min(err(a, b) for a, b in grid) + 1e-5


def test_genie_m_reconstruction_beats_its_own_start_and_stores_what_runs():
    m = resnet()
    x = smooth(48, seed=7)
    tr = trace(m, x[:2])
    fold_batchnorm(m, tr)
    fp = copy.deepcopy(m)
    plan = default_plan(tr.order, 3, 4)
    plan.units = units(m, tr.order)
    cold = copy.deepcopy(m)
    genie_m(cold, plan, [x], GenieMConfig(iterations=0, start="nearest"), progress=False)
    warm = copy.deepcopy(m)
    torch.manual_seed(0)                                        # QDrop's draws
    packed, quantizers, _ = genie_m(warm, plan, [x], GenieMConfig(iterations=200, start="nearest"),
                                 progress=False)
    ref = fp(x).logits

    def err(model):
        return float((model(x).logits - ref).pow(2).mean())
    assert err(warm) < 0.7 * err(cold)
    for n, p in packed.items():
        torch.testing.assert_close(warm.get_submodule(n).weight.reshape(p.shape), p.dequantize())
    assert set(quantizers) == set(tr.order[1:])                 # the image itself stays fp
    _, y = capture(warm, warm.get_submodule("classifier"), [x])
    torch.testing.assert_close(y, warm(x).logits)


def test_data_free_needs_batchnorm_and_image_errors_are_clear():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(1, 3, 8, 8))
    with pytest.raises(QuantkitError, match="no BatchNorm2d"):
        BNStatLoss(plain, per_image=True)
    with pytest.raises(QuantkitError, match="no BatchNorm2d"):
        quantize_image_model(plain, "zeroq", progress=False)
    with pytest.raises(QuantkitError, match="--calib 'imagenet'"):
        quantize_image_model(resnet(), "imagenet", progress=False)
    with pytest.raises(QuantkitError, match="not available"):
        quantize_image_model(resnet(), smooth(4), method="nupes", progress=False)


def test_bn_reestimation_gives_each_folded_layer_the_fp_channel_statistics(tmp_path):
    """After W4A4 quantization, each BN-folded layer's output channels have the fp model's mean
    (exactly) and std (to the fp16 scales), measured with every correction in place; the codes
    and zero points are untouched, the scales only multiplied; the saved checkpoint runs the
    corrected biases."""
    import quantkit
    from quantkit.formats.packed import int_parts
    x = smooth(48, seed=7)

    def channel_stats(model, names):          # per output channel, over images and positions
        seen, hs = {}, []
        for n in names:
            hs.append(model.get_submodule(n).register_forward_hook(
                lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach().double())))
        with torch.no_grad():
            model(x)
        for h in hs:
            h.remove()
        return {n: (y.mean((0, 2, 3)), y.std((0, 2, 3), unbiased=False)) for n, y in seen.items()}

    fp = resnet()
    tr = trace(fp, x[:2])
    fold_batchnorm(fp, tr)
    plain = quantize_image_model(resnet(), x, bits=4, act_bits=4, method="rtn", progress=False)
    rep = quantize_image_model(resnet(), x, bits=4, act_bits=4, method="rtn", bn_reestimate=True,
                               progress=False)
    layers = [n for n in tr.order if n in tr.bn_of]
    assert sorted(rep.biases) == sorted(layers) and len(layers) == 6
    want = channel_stats(fp, layers)
    got = channel_stats(rep.model, layers)
    before = channel_stats(plain.model, layers)
    for n in layers:
        assert torch.allclose(got[n][0], want[n][0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(got[n][1], want[n][1], rtol=2e-3)
        assert not torch.allclose(before[n][1], want[n][1], rtol=2e-3)      # there was a gap
        c0, s0, z0, _ = int_parts(plain.packed[n])
        c1, s1, z1, _ = int_parts(rep.packed[n])
        assert torch.equal(c0, c1) and torch.equal(z0, z1) and not torch.equal(s0, s1)
    src = tmp_path / "src"
    resnet().save_pretrained(src)                   # the architecture the checkpoint rebuilds
    rep.source = str(src)
    rep.save(tmp_path / "q")
    loaded = quantkit.load(str(tmp_path / "q"), kernel="reference")
    assert torch.equal(loaded(x[:8]).logits, rep.model(x[:8]).logits)


@pytest.mark.parametrize("build,channels", [(resnet, 1), (mobilenet, 3)])
def test_bias_correction_restores_each_layers_mean_output_on_fp_inputs(build, channels):
    """Weight-only 2-bit RTN, then bias correction: fed the unquantized model's own input, every
    layer (depthwise, strided, padded, linear) gives each output channel the same mean over the
    calibration images and positions as the unquantized layer (E[δW·x] taken off the bias);
    without the correction it does not."""
    x = smooth(32, channels, seed=3)
    fp = build()
    tr = trace(fp, x[:2])
    fold_batchnorm(fp, tr)
    plain = quantize_image_model(build(), x, bits=2, act_bits=None, method="rtn", edge_bits=2,
                                 progress=False)
    rep = quantize_image_model(build(), x, bits=2, act_bits=None, method="rtn", edge_bits=2,
                               bias_correction=True, progress=False)
    assert sorted(rep.biases) == sorted(tr.order)
    inputs, hs = {}, []
    for n in tr.order:
        hs.append(fp.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: inputs.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        fp(x)
    for h in hs:
        h.remove()

    def mean_out(model, n):
        with torch.no_grad():
            y = model.get_submodule(n)(inputs[n]).double()
        return y.mean((0, 2, 3)) if y.dim() == 4 else y.mean(0)
    groups = {fp.get_submodule(n).groups for n in tr.order if isinstance(fp.get_submodule(n), nn.Conv2d)}
    assert groups != {1} or build is resnet                     # mobilenet has depthwise convs
    for n in tr.order:
        want = mean_out(fp, n)
        assert torch.allclose(mean_out(rep.model, n), want, atol=1e-5, rtol=1e-4), n
        assert torch.equal(rep.model.get_submodule(n).bias, rep.biases[n])
        assert not torch.allclose(mean_out(plain.model, n), want, atol=1e-3, rtol=1e-2), n
        assert torch.equal(rep.model.get_submodule(n).weight, plain.model.get_submodule(n).weight)


def test_genie_class_term_is_cross_entropy_toward_fixed_random_classes():
    """class_weight w adds exactly w·CE(logits, targets), the targets drawn once per batch from
    the generator and kept; distilled with it, the images are classified with more confidence
    (this tiny model's classifier is untrained: its logits barely move); with class_weight 0
    distillation is what it was without the option."""
    m, x = resnet(), smooth(6, seed=4)
    plain = BNStatLoss(m, per_image=False)(x)
    term = BNStatLoss(m, per_image=False, class_weight=3.0, generator=torch.Generator().manual_seed(5))
    got = term(x)
    targets = torch.randint(10, (6,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(term.targets, targets)
    want = plain + 3.0 * F.cross_entropy(m(x).logits, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(term(x), want, rtol=1e-5, atol=1e-5)          # same targets
    opts = dict(iterations=150, batch_size=16, width=16)
    with_term = distill(resnet(), "genie", n=16, seed=0, progress=False, class_weight=10.0, **opts)
    without = distill(resnet(), "genie", n=16, seed=0, progress=False, **opts)
    assert torch.equal(without, distill(resnet(), "genie", n=16, seed=0, progress=False,
                                        class_weight=0.0, **opts))
    with torch.no_grad():
        confidence = {k: float(torch.softmax(m(v).logits, -1).max(-1).values.mean())
                      for k, v in (("with", with_term), ("without", without))}
    assert confidence["with"] > 1.2 * confidence["without"]
