"""ARMOR 2:4 factorization: masks, block-diagonal algebra, init baselines, monotone BCD, support step."""
from __future__ import annotations

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.prune import armor as ar
from quantkit.formats.sparse import block_diag_apply
from quantkit.prune.armor import armor_dense, armor_factorize, armor_proxy
from quantkit.prune.mask import is_nm, nm_mask


def _structured(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer with correlated rows and columns (low rank + noise, uneven scales) and a skewed h."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, 6, generator=g) @ torch.randn(6, in_f, generator=g)
    W = W + 0.3 * torch.randn(out_f, in_f, generator=g)
    W = W * torch.rand(1, in_f, generator=g).add(0.2) * torch.rand(out_f, 1, generator=g).add(0.5)
    h = torch.randn(in_f, generator=g).exp()
    return W, h


def _normalised(W: torch.Tensor) -> torch.Tensor:
    """W̄ from its definition: divide by column L2 norms, then by row L2 norms."""
    Wc = W / W.norm(dim=0, keepdim=True)
    return Wc / Wc.norm(dim=1, keepdim=True)


def _eye_blocks(d: int, b: int) -> torch.Tensor:
    return torch.eye(b).repeat(-(-d // b), 1, 1)


def _proxy_of(pb: ar._Problem, st: ar._State) -> float:
    """The tile-space loss recomputed from scratch (not from the incrementally kept residual)."""
    ar._forward(pb, st)
    return ar._refresh_grad_input(pb, st)


@pytest.mark.parametrize("shape,b", [((72, 96), 32), ((40, 72), 32), ((48, 64), 16)])
def test_mask_is_exactly_2_of_4_and_core_zero_off_mask(shape, b):
    W, h = _structured(*shape)
    r = armor_factorize(W, h, block_size=b, iters=40)
    assert r.mask.shape == W.shape and r.mask.dtype == torch.bool and is_nm(r.mask, 2, 4)
    assert bool((r.core[~r.mask] == 0).all())
    assert r.post.shape == (-(-shape[0] // b), b, b) and r.pre.shape == (-(-shape[1] // b), b, b)
    assert len(r.losses) == 41


def test_zero_iterations_is_the_nowag_p_baseline():
    W, h = _structured(40, 72)
    r = armor_factorize(W, h, block_size=32, iters=0)
    expected_mask = nm_mask(_normalised(W).square() * h, 2, 4)
    assert torch.equal(r.mask, expected_mask)
    # exact up to the fp32 rounding of dividing by the norms and folding them back in
    torch.testing.assert_close(armor_dense(r), W * expected_mask, rtol=1e-6, atol=1e-7)
    assert r.losses == [pytest.approx(armor_proxy(W, h, r.post, r.core, r.pre), rel=1e-5)]


def test_zero_iterations_with_init_mask_is_the_masked_weight():
    W, h = _structured(40, 72)
    init = nm_mask(W.abs(), 2, 4)         # e.g. a magnitude, SparseGPT or Wanda mask
    r = armor_factorize(W, h, block_size=32, iters=0, init_mask=init)
    assert torch.equal(r.mask, init)
    torch.testing.assert_close(armor_dense(r), W * init, rtol=1e-6, atol=1e-7)


def test_losses_monotone_and_strictly_lower_and_match_the_factorization():
    W, h = _structured(64, 128)
    r = armor_factorize(W, h, block_size=16, iters=300, lr=1e-3)
    L = r.losses
    assert all(b <= a for a, b in zip(L, L[1:]))
    assert L[-1] < 0.8 * L[0]
    assert armor_proxy(W, h, r.post, r.core, r.pre) == pytest.approx(L[-1], rel=1e-4)
    # the proxy is what the reconstruction pays, measured in W's own units
    Wn, rows, cols = ar._normalise(W)
    err = (armor_dense(r) - W) / rows[:, None] / cols[None, :]
    assert float((h * err.square()).sum() / (h * Wn.square()).sum()) == pytest.approx(L[-1], rel=1e-4)


def test_same_seed_same_result_and_early_stop():
    W, h = _structured(32, 64)
    r1 = armor_factorize(W, h, block_size=16, iters=50, seed=3)
    r2 = armor_factorize(W, h, block_size=16, iters=50, seed=3)
    assert torch.equal(r1.core, r2.core) and torch.equal(r1.post, r2.post) and r1.losses == r2.losses
    flat = armor_factorize(W, h, block_size=16, iters=1000, lr=0.0, tol=1.0)   # no step can gain 100 %
    assert len(flat.losses) == 101


def test_support_step_alone_never_increases_the_loss():
    W, h = _structured(72, 88, seed=1)       # ragged in both dimensions
    pb = ar._Problem.build(W, h, 2, 4, 32)
    st = ar._init_state(pb, nm_mask(W.abs(), 2, 4))
    gen = torch.Generator().manual_seed(0)
    prev = ar._refresh_grad_input(pb, st)
    first = prev
    for _ in range(40):
        ar._gradients(st)
        ar._support_step(pb, st, gen)
        kept = ar._refresh_grad_input(pb, st)
        now = _proxy_of(pb, st)
        assert now == pytest.approx(kept, rel=1e-5)          # the incremental residual is exact
        assert now <= prev * (1 + 1e-6)
        prev = now
    assert prev < 0.95 * first
    out_f, in_f = W.shape
    assert is_nm(st.keep[:out_f, :in_f] > 0) and not st.keep[out_f:].any() and not st.keep[:, in_f:].any()
    # with lr = 0 the wrappers stay the identity: only the norms are folded in
    r = armor_factorize(W, h, block_size=32, iters=30, lr=0.0)
    cols = torch.ones(96)
    cols[:88] = ar._normalise(W)[2]
    torch.testing.assert_close(r.pre, _eye_blocks(88, 32) * cols.view(-1, 1, 32))


def _tile_state(Wn: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, S: torch.Tensor,
                mask: torch.Tensor, b: int) -> tuple[ar._Problem, ar._State]:
    """Internal problem/state for a given normalised target (dims multiples of b, so no padding)."""
    pb = ar._Problem.build(torch.ones_like(Wn), h, 2, 4, b)
    pb.Wt = ar._col_blocks(Wn, b)
    pb.hw2 = (2 * h / float((h * Wn.square()).sum())).view(-1, 1, b)
    return pb, ar._new_state(pb, A.clone(), B.clone(), S.clone(), mask.float())


def test_support_step_finds_the_known_best_support():
    # W̄ = S*·blockdiag(B) with b = 4 (one group per tile row) and one group per tile given the wrong
    # support: only that group has a gradient, and the coupling through B and h decides its support
    g = torch.Generator().manual_seed(5)
    b, d = 4, 8
    A = torch.eye(b).repeat(d // b, 1, 1)
    B = torch.eye(b) + 0.4 * torch.randn(d // b, b, b, generator=g)
    true_mask = nm_mask(torch.rand(d, d, generator=g), 2, 4)
    S_true = torch.randn(d, d, generator=g) * true_mask
    h = torch.rand(d, generator=g) + 0.5
    wrong = true_mask.clone()
    for row, col in ((1, 0), (2, 4), (4, 0), (7, 4)):        # one group in each of the 4 tiles
        wrong[row, col:col + 4] = ~wrong[row, col:col + 4]
    Wn = block_diag_apply(B, S_true, "right")
    pb, st = _tile_state(Wn, h, A, B, S_true, wrong, b)
    before = ar._refresh_grad_input(pb, st)
    ar._gradients(st)
    ar._support_step(pb, st, torch.Generator().manual_seed(0))
    assert before > 1e-2 and _proxy_of(pb, st) < 1e-10
    assert torch.equal(st.keep > 0, true_mask)
    torch.testing.assert_close(st.S, S_true, atol=1e-5, rtol=1e-5)


def test_support_step_equals_brute_force_least_squares():
    g = torch.Generator().manual_seed(6)
    b, d = 8, 16
    A = torch.eye(b) + 0.3 * torch.randn(d // b, b, b, generator=g)
    B = torch.eye(b) + 0.3 * torch.randn(d // b, b, b, generator=g)
    Wn, h = torch.randn(d, d, generator=g), torch.rand(d, generator=g) + 0.2
    mask = nm_mask(torch.rand(d, d, generator=g), 2, 4)
    pb, st = _tile_state(Wn, h, A, B, torch.randn(d, d, generator=g), mask, b)
    S0, before = st.S.clone(), ar._refresh_grad_input(pb, st)
    ar._gradients(st)
    sel = ar._sample_groups(pb, st.dS.clone(), torch.Generator().manual_seed(1))
    ar._support_step(pb, st, torch.Generator().manual_seed(1))
    Ad, Bd = torch.block_diag(*A).double(), torch.block_diag(*B).double()
    S_bf = S0.double()
    for t, s in enumerate(sel.tolist()):     # tile t = (column block, row block); tiles do not interact
        row, col = (t % 2) * b + s // 2, (t // 2) * b + (s % 2) * 4
        S_bf[row, col:col + 4] = 0
        R = (Ad @ S_bf @ Bd - Wn.double()) * h.double().sqrt()
        best = (float("inf"), None)
        for sup in ([0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]):
            X = torch.stack([(torch.outer(Ad[:, row], Bd[col + p]) * h.double().sqrt()).flatten()
                             for p in sup], 1)
            v = torch.linalg.lstsq(X, -R.flatten()[:, None]).solution[:, 0]
            cost = float((R.flatten() + X @ v).square().sum())
            best = min(best, (cost, (sup, v)), key=lambda c: c[0])
        sup, v = best[1]
        S_bf[row, [col + p for p in sup]] = v
        assert torch.equal(st.keep[row, col:col + 4] > 0, S_bf[row, col:col + 4] != 0)
    torch.testing.assert_close(st.S, S_bf.float(), atol=1e-4, rtol=1e-4)
    assert _proxy_of(pb, st) < before


def test_support_step_recovers_the_optimal_mask_from_the_worst_one():
    # with A = B = I (lr = 0) the best support of every group is the top 2 of W̄²·h
    W, h = _structured(16, 32, seed=2)
    score = _normalised(W).square() * h
    worst = nm_mask(-score, 2, 4)
    r = armor_factorize(W, h, block_size=16, iters=400, lr=0.0, init_mask=worst)
    assert torch.equal(r.mask, nm_mask(score, 2, 4))


def test_armor_beats_a_plain_magnitude_mask():
    W, h = _structured(64, 128, seed=3)
    magnitude = nm_mask(W.abs(), 2, 4)
    base = armor_proxy(W, h, _eye_blocks(64, 16), W * magnitude, _eye_blocks(128, 16))
    r = armor_factorize(W, h, block_size=16, iters=300, lr=1e-3)
    assert r.losses[0] < base                  # NoWag-P is already better than magnitude
    assert armor_proxy(W, h, r.post, r.core, r.pre) < 0.6 * base


def test_dead_inputs_and_zero_rows_stay_finite():
    W, h = _structured(40, 64, seed=4)
    W[3] = 0                              # an all-zero output row
    W[:, 8] = 0                           # an all-zero input column
    h[16:20] = 0                          # inputs that never fire
    r = armor_factorize(W, h, block_size=16, iters=100, lr=1e-3)
    assert all(torch.isfinite(t).all() for t in (r.post, r.core, r.pre)) and is_nm(r.mask)
    assert r.losses[-1] < r.losses[0]
    assert armor_proxy(W, h, r.post, r.core, r.pre) == pytest.approx(r.losses[-1], rel=1e-4)
    assert armor_factorize(torch.zeros(8, 16), torch.ones(16), block_size=8, iters=5).losses == [0.0] * 6


@pytest.mark.parametrize("kwargs", [
    dict(W=torch.randn(8, 10)),                               # in_features not a multiple of 4
    dict(block_size=6),                                       # block not whole groups
    dict(h=-torch.ones(16)),
    dict(h=torch.ones(15)),
    dict(init_mask=torch.ones(8, 16, dtype=torch.bool)),      # not 2:4
    dict(n=4, m=4),
])
def test_bad_inputs_raise(kwargs):
    args = dict(W=torch.randn(8, 16), h=torch.ones(16), iters=1) | kwargs
    if args["W"].shape[1] != 16:
        args["h"] = torch.ones(args["W"].shape[1])
    with pytest.raises(QuantkitError):
        armor_factorize(**args)


def test_a_diverging_learning_rate_returns_the_best_iterate():
    """At lr 1 Adam overshoots and the loss rises above the start: the result is the best iterate
    seen (here the initial one or close to it), never the last."""
    W, h = _structured(32, 64)
    r = armor_factorize(W, h, block_size=16, iters=20, lr=1.0)
    got = armor_proxy(W, h, r.post, r.core, r.pre)
    assert got == pytest.approx(r.losses[-1], rel=1e-4) and got <= r.losses[0] * (1 + 1e-6)
    assert all(b <= a for a, b in zip(r.losses, r.losses[1:]))
