import pytest
import torch

from quantkit.formats.packed import make_int
from quantkit.quant.base import QSpec, fit_groups
from quantkit.quant.gptq import gptq_codes
from quantkit.quant.grid import fit_grid, minmax_grid, quantize
from quantkit.quant.rtn import rtn_codes


def layer(out_f=48, in_f=144, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    X = torch.randn(2000, in_f, generator=g) @ mix + 0.3 * torch.randn(in_f, generator=g)
    X[:, 5] *= 20  # an outlier feature, as in real LLM activations
    return W, X.T @ X / X.shape[0]


def proxy(W, Q, H):
    E = W - Q
    return float((E @ H * E).sum())


def deq(codes, scales, zeros, gsz, g_idx=None):
    in_f = codes.shape[1]
    gi = g_idx if g_idx is not None else (torch.arange(in_f) // (gsz if gsz > 0 else in_f))
    return (codes.float() - zeros[:, gi]) * scales[:, gi]


def textbook_gptq(W, H, spec: QSpec, damp=0.01):
    """Plain GPTQ as published: one column at a time, no lazy batching, dynamic groups."""
    W, H = W.clone().double(), H.clone().double()
    in_f = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(in_f, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gw = in_f if spec.group_size <= 0 else spec.group_size
    codes = torch.zeros_like(W)
    s = z = None
    for j in range(in_f):
        if j % gw == 0:
            s, z = fit_grid(W[:, j:j + gw].float(), spec.bits, spec.sym, spec.mse)
            s, z = s.double(), z.double()
        q = quantize(W[:, j], s, z, spec.bits)
        codes[:, j] = q
        e = (W[:, j] - (q - z) * s) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return codes.int()


BITS, GROUPS = (2, 3, 4, 8), (-1, 32, 64, 128)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_identity_hessian_gives_rtn_codes(bits, gs):
    W, _ = layer()
    for act_order in (False, True):
        spec = QSpec(bits=bits, group_size=gs, act_order=act_order, static_groups=True)
        codes, *_ = gptq_codes(W, torch.eye(W.shape[1]), spec)
        assert torch.equal(codes, rtn_codes(W, spec)[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_gptq_layer_loss_below_rtn(bits, gs):
    W, H = layer()
    for act_order, static in ((False, True), (True, True), (True, False)):
        spec = QSpec(bits=bits, group_size=gs, act_order=act_order, static_groups=static)
        c, s, z, gi = gptq_codes(W, H, spec)[:4]
        assert c.min() >= 0 and c.max() < (1 << bits)
        rc, rs, rz = rtn_codes(W, spec)
        g_loss, r_loss = proxy(W, deq(c, s, z, gs, gi), H), proxy(W, deq(rc, rs, rz, gs), H)
        assert g_loss < r_loss, (act_order, static, g_loss, r_loss)


def test_matches_textbook_reference():
    W, H = layer(in_f=256)
    for bits, gs in ((3, 64), (4, -1), (2, 32)):
        spec = QSpec(bits=bits, group_size=gs, act_order=False, mse=False)
        fast, *_ = gptq_codes(W, H, spec)
        ref = textbook_gptq(W, H, spec)
        assert (fast == ref).float().mean() > 0.999


def test_scaled_hessian_same_codes_and_diagonal_is_rtn():
    W, H = layer()
    spec = QSpec(bits=3, group_size=32, act_order=False)
    a = gptq_codes(W, H, spec)[0]
    assert (a == gptq_codes(W, H * 7.0, spec)[0]).float().mean() > 0.999
    diag = torch.diag(torch.rand(W.shape[1]) + 0.5)
    assert torch.equal(gptq_codes(W, diag, spec)[0], rtn_codes(W, spec)[0])


def test_dead_columns_are_zeroed():
    W, H = layer()
    H[:, 7] = 0
    H[7, :] = 0
    spec = QSpec(bits=4, group_size=32, act_order=False)
    c, s, z, gi = gptq_codes(W, H, spec)[:4]
    assert torch.allclose(deq(c, s, z, 32, gi)[:, 7], torch.zeros(W.shape[0]), atol=s.max().item())


def test_mse_grid_not_worse_than_minmax():
    W, _ = layer()
    gi = torch.arange(144) // 32

    def err(bits, mse):
        s, z = fit_groups(W, QSpec(bits=bits, group_size=32, mse=mse))
        return ((deq(quantize(W, s[:, gi], z[:, gi], bits), s, z, 32) - W) ** 2).sum()
    for bits in (2, 3, 4):
        assert err(bits, True) <= err(bits, False) + 1e-6


def test_symmetric_grid_has_fixed_zero():
    W, H = layer()
    spec = QSpec(bits=4, group_size=64, sym=True)
    c, s, z, gi = gptq_codes(W, H, spec)[:4]
    assert torch.all(z == 8)
    p = make_int(c, s, None, 4, 64, gi)
    assert "qzeros" not in p.tensors and torch.allclose(p.dequantize(), deq(c, s, z, 64, gi))


def test_asymmetric_minmax_grid_rounds_the_zero_to_nearest():
    # range [-0.3, 1.2] at 4 bits: scale 1.5/15 (stored fp16), -min/scale = 3.0007 -> zero 3
    # (ceil would give 4 and shift every code); the all-positive row gets zero 0 and its
    # range starts at 0; a flat zero row gets the unit fallback range [-1, 1].
    x = torch.tensor([[-0.3, 0.0, 0.7, 1.2], [0.5, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    s, z = minmax_grid(x, 4, sym=False)
    f16 = lambda v: torch.tensor(v).to(torch.float16).float()  # noqa: E731
    assert torch.equal(s, torch.stack([f16(1.5 / 15), f16(3.0 / 15), f16(2.0 / 15)]))
    assert z.tolist() == [3.0, 0.0, 8.0]
    err = ((quantize(x, s[:, None], z[:, None], 4) - z[:, None]) * s[:, None] - x).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)


def test_fp_target_weight_solves_least_squares():
    from quantkit.quant.base import LayerStats, fp_target_weight
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    xq = torch.randn(400, 10, generator=g, dtype=torch.float64)
    xfp = xq + 0.1 * torch.randn(400, 10, generator=g, dtype=torch.float64)
    H, C = xq.T @ xq / 400, xfp.T @ xq / 400
    assert torch.equal(fp_target_weight(W, LayerStats(H, 400, cross=H)), W)  # no drift: unchanged
    V = fp_target_weight(W, LayerStats(H, 400, cross=C), damp=0.0)
    best = torch.linalg.lstsq(xq, xfp @ W.T).solution.T
    assert torch.allclose(V, best, atol=1e-10)


SPECS = [QSpec(bits=b, group_size=g, act_order=a, static_groups=s)
         for b in (2, 3, 4) for g in (32, -1) for a, s in ((False, True), (True, True), (True, False))]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_column_losses_sum_to_the_proxy(spec):
    # Σ_j (w_j - ŵ_j)² / [H⁻¹]_jj over the processed columns is exactly tr(E H Eᵀ) (no damping)
    W, H = layer()
    spec = QSpec(**{**spec.__dict__, "damp": 0.0})
    c, s, z, gi, loss, _ = gptq_codes(W.double().float(), H, spec)
    assert float(loss.sum()) == pytest.approx(proxy(W, deq(c, s, z, spec.group_size, gi), H), rel=1e-3)


@pytest.mark.parametrize("spec", SPECS[:6], ids=str)
def test_full_levels_are_plain_gptq(spec):
    W, H = layer()
    levels = torch.full((W.shape[1],), 1 << spec.bits)
    assert all(torch.equal(a, b) for a, b in zip(gptq_codes(W, H, spec)[:5], gptq_codes(W, H, spec, levels=levels)[:5]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_baq_columns_beat_gptq_within_its_size(bits):
    from quantkit.quant.base import LayerStats
    from quantkit.quant.gptq import gptq, gptq_baq
    # input features of very uneven scale, as in LLMs: where BAQ's reallocation pays
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=g)
    X = torch.randn(2000, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    H = X.T @ X / 2000
    stats, spec = LayerStats(H, 2000), QSpec(bits=bits, group_size=64)
    plain, baq = gptq(W, stats, spec), gptq_baq(W, stats, spec)
    assert baq.format == "int-levels" and baq.storage_bits() <= plain.storage_bits()
    assert proxy(W, baq.dequantize(), H) < 0.8 * proxy(W, plain.dequantize(), H)
    # where the reallocation does not pay (uniform columns), plain GPTQ's result is kept
    W2, H2 = layer(out_f=64, in_f=256)
    assert proxy(W2, gptq_baq(W2, LayerStats(H2, 2000), spec).dequantize(), H2) <= \
        proxy(W2, gptq(W2, LayerStats(H2, 2000), spec).dequantize(), H2)


def test_column_levels_closed_form_and_budget():
    from quantkit.quant.levels import THETA, column_levels
    from quantkit.formats.packed import levels_storage_bits
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(300, generator=g, dtype=torch.float64) ** 4 * 100
    loss[7] = 0                                      # a dead column gets one level (nothing stored)
    out_f, bits = 64, 3
    budget = 64 * 300 * 3
    levels = column_levels(loss, out_f, bits, budget)
    assert levels[7] == 1 and levels_storage_bits(out_f, levels.tolist()) <= budget
    # the rate-loss model's predicted losses L_j (2^b/m_j)^θ are nearly equal (the equal-loss structure)
    pred = (loss * (2 ** bits / levels.double()) ** THETA)[levels > 1]
    spread = torch.log2(pred).std() / torch.log2(loss[loss > 0]).std()
    assert spread < 0.2
    # an upgrade of any column no longer fits
    nxt = levels_storage_bits(out_f, levels.tolist()) + min(
        levels_storage_bits(out_f, [m + 1]) - levels_storage_bits(out_f, [m]) for m in levels.tolist()
        if levels_storage_bits(out_f, [m + 1]) > levels_storage_bits(out_f, [m]))
    assert nxt > budget


@pytest.mark.parametrize("block, inner", [(128, 16), (64, 64), (32, 8), (7, 3)])
def test_feedback_loop_with_any_rounder_matches_one_column_at_a_time(block, inner):
    """The one GPTQ loop takes its rounding as a function: a custom grid (multiples of 0.3)
    gives the same codes as GPTQ written column by column in double, whatever the blocking."""
    from quantkit.quant.gptq import feedback, inverse_hessian_factor
    W, H = layer(in_f=96)
    U = inverse_hessian_factor(H.double(), 0.01)
    Wd = W.double().clone()
    ref, ref_loss = torch.zeros_like(Wd), torch.zeros(W.shape[1], dtype=torch.float64)
    for j in range(W.shape[1]):
        ref[:, j] = torch.round(Wd[:, j] / 0.3)
        e = (Wd[:, j] - ref[:, j] * 0.3) / U[j, j]
        ref_loss[j] = (e * e).sum()
        Wd[:, j:] -= e[:, None] * U[j, j:][None, :]

    def step(j, Wt):
        q = torch.round(Wt[j] / 0.3)
        return q, q * 0.3
    codes_t, losses = feedback(W.t().contiguous(), U.float(), step, block, inner)
    assert (codes_t.t() == ref.float()).float().mean() > 0.999
    torch.testing.assert_close(losses.double(), ref_loss, rtol=2e-2, atol=1e-4)
    assert float(losses.sum()) == pytest.approx(float(ref_loss.sum()), rel=1e-3)
