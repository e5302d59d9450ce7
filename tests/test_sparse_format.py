"""The "sparse" format (N:M core, quantized or not, ARMOR wrappers) and its kernels vs dequantize()."""
import itertools
import warnings

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats.io import atomic_dir, save_packed
from quantkit.formats.packed import n_groups
from quantkit.formats.sparse import block_diag_apply, make_sparse, make_sparse_int, sparse_core
from quantkit.kernels import KERNELS, select
from quantkit.kernels.sparse import as_int, core_path
from quantkit.model.discovery import find_blocks, linears
from quantkit.nn.qlinear import QuantLinear, replace_linear
from quantkit.prune.mask import nm_mask
from tests.conftest import tiny_model, token_batches

SUPPORTS = list(itertools.combinations(range(4), 2))   # the 6 ways to keep 2 of 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fp16_weight(out_f, in_f, seed=0):
    return torch.randn(out_f, in_f, generator=gen(seed)).half().float()


def random_mask(out_f, in_f, n=2, m=4, seed=0):
    return nm_mask(torch.rand(out_f, in_f, generator=gen(seed + 100)), n, m)


def grid(out_f, in_f, bits, gs, sym, seed=0):
    """Random codes, fp16-exact scales and (asym) integer zeros for a quantized core."""
    g = gen(seed)
    G = n_groups(in_f, gs)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    scales = (torch.rand(out_f, G, generator=g) * 0.1 + 0.01).half().float()
    zeros = None if sym else torch.randint(0, 1 << bits, (out_f, G), generator=g)
    return codes, scales, zeros


def blocks(d, b, seed=0):
    return (torch.eye(b) + 0.1 * torch.randn(-(-d // b), b, b, generator=gen(seed))).half().float()


def explicit(bl, d):
    return torch.block_diag(*bl)[:d, :d]


def test_fp16_round_trip_every_support_and_index_layout():
    W = fp16_weight(6, 24)
    for i, j in SUPPORTS:   # every group of every row keeps the same pair
        mask = torch.zeros(6, 24, dtype=torch.bool)
        mask[:, i::4] = mask[:, j::4] = True
        p = make_sparse(W, mask)
        assert torch.equal(p.dequantize(), W * mask)
        S, got_mask = sparse_core(p)
        assert torch.equal(got_mask, mask) and torch.equal(S, W * mask)
        # one nibble per group: first index in the low 2 bits; 6 groups fill 24 bits of word 0
        nibble = i | (j << 2)
        assert p.tensors["indices"].shape == (6, 1)
        assert int(p.tensors["indices"][0, 0]) == sum(nibble << (4 * k) for k in range(6))
    mask = random_mask(16, 64)      # mixed supports
    p = make_sparse(fp16_weight(16, 64, 1), mask)
    assert p.meta == {"n": 2, "m": 4, "bits": 16, "group_size": -1, "sym": True, "block_size": 0}
    assert torch.equal(p.tensors["values"].float(), fp16_weight(16, 64, 1)[mask].reshape(16, 32))
    assert torch.equal(p.dequantize(), fp16_weight(16, 64, 1) * mask)


def test_other_patterns_round_trip():
    for n, m in ((1, 4), (2, 8), (4, 8)):
        W, mask = fp16_weight(5, 32), random_mask(5, 32, n, m)
        p = make_sparse(W, mask, n, m)
        assert p.tensors["values"].shape == (5, 32 * n // m)
        assert torch.equal(p.dequantize(), W * mask)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [8, 16, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quantized_core_is_exact(bits, gs, sym):
    out_f, in_f = 12, 40     # 40 in groups of 16: a ragged last group
    codes, scales, zeros = grid(out_f, in_f, bits, gs, sym)
    mask = random_mask(out_f, in_f)
    p = make_sparse_int(codes, mask, scales, zeros, bits, gs)
    assert ("qzeros" in p.tensors) == (not sym) and p.meta["bits"] == bits
    g_idx = torch.zeros(in_f, dtype=torch.long) if gs < 0 else torch.arange(in_f) // gs
    z = torch.full_like(scales, 2 ** (bits - 1)) if sym else zeros.float()
    expect = ((codes.float() - z[:, g_idx]) * scales[:, g_idx]) * mask
    assert torch.equal(p.dequantize(), expect)
    assert torch.equal(as_int(p).dequantize(), expect)   # what the CPU kernels are built from


@pytest.mark.parametrize("d_out, d_in, b", [(72, 40, 32), (64, 96, 32), (20, 8, 16)])
def test_wrappers_match_explicit_block_diagonals(d_out, d_in, b):
    W, mask = fp16_weight(d_out, d_in), random_mask(d_out, d_in)
    pre, post = blocks(d_in, b, 1), blocks(d_out, b, 2)
    p = make_sparse(W, mask, pre=pre, post=post)
    assert p.meta["block_size"] == b and p.tensors["pre"].dtype == torch.float16
    expect = explicit(post, d_out) @ (W * mask) @ explicit(pre, d_in)
    assert torch.allclose(p.dequantize(), expect, rtol=1e-5, atol=1e-5)
    only_pre = make_sparse(W, mask, pre=pre)
    assert torch.allclose(only_pre.dequantize(), (W * mask) @ explicit(pre, d_in), rtol=1e-5, atol=1e-5)
    codes, scales, zeros = grid(d_out, d_in, 4, 8, False)
    q = make_sparse_int(codes, mask, scales, zeros, 4, 8, post=post)
    assert torch.allclose(q.dequantize(), explicit(post, d_out) @ sparse_core(q)[0], rtol=1e-5, atol=1e-5)


def test_block_diag_apply_matches_explicit_and_ignores_padding():
    bl = torch.randn(3, 32, 32, generator=gen(3))
    X = torch.randn(72, 5, generator=gen(4))
    assert torch.allclose(block_diag_apply(bl, X, "left"), explicit(bl, 72) @ X, atol=1e-4)
    assert torch.allclose(block_diag_apply(bl, X.T, "right"), X.T @ explicit(bl, 72), atol=1e-4)
    X3 = torch.randn(2, 4, 72, generator=gen(5))
    assert torch.allclose(block_diag_apply(bl, X3, "right"), X3 @ explicit(bl, 72), atol=1e-4)
    poisoned = bl.clone()
    poisoned[-1, 8:, :] = poisoned[-1, :, 8:] = 1e30   # outside the top-left 8x8 that d=72 uses
    assert torch.allclose(block_diag_apply(poisoned, X, "left"), explicit(bl, 72) @ X, atol=1e-4)
    with pytest.raises(QuantkitError, match="cannot cover"):
        block_diag_apply(bl, torch.randn(100, 2), "left")
    with pytest.raises(QuantkitError, match="side"):
        block_diag_apply(bl, X, "up")


def test_storage_bits():
    W, mask = fp16_weight(8, 64), random_mask(8, 64)
    assert make_sparse(W, mask).storage_bits() == 8 * 64 * (8 + 1)      # 8 value + 1 index bit
    codes, scales, _ = grid(8, 64, 4, -1, True)
    q = make_sparse_int(codes, mask, scales, None, 4, -1)
    assert q.storage_bits() == 8 * 64 * (2 + 1) + 8 * 16                # + one fp16 scale per row
    wrapped = make_sparse(W, mask, pre=blocks(64, 32), post=blocks(8, 32))
    assert wrapped.storage_bits() == 8 * 64 * 9 + (2 + 1) * 32 * 32 * 16


def test_invalid_inputs_raise_clear_errors():
    W = fp16_weight(4, 16)
    mask = random_mask(4, 16)
    cases = [
        (lambda: make_sparse(W, mask & (torch.rand(4, 16, generator=gen(1)) > 0.3)), "exactly 2 of every 4"),
        (lambda: make_sparse(W[:, :14], mask[:, :14]), "not a multiple of m=4"),
        (lambda: make_sparse(W, mask[:3]), "mask shape"),
        (lambda: make_sparse(W, mask, 4, 4), "0 < n < m"),
        (lambda: make_sparse(W, mask, pre=torch.randn(2, 4, 4)), r"must be \[ceil\(16/b\), b, b\]"),
        (lambda: make_sparse(W, mask, pre=blocks(16, 8), post=blocks(4, 4)), "one block size"),
        (lambda: make_sparse_int(W.long().abs() % 16, mask, torch.ones(4, 2), None, 4, 6), "multiple of m=4"),
        (lambda: make_sparse_int(W.long().abs() % 16, mask, torch.ones(4, 3), None, 4, 8), r"expected \[4, 2\]"),
        (lambda: make_sparse_int(torch.full((4, 16), 16), mask, torch.ones(4, 1), None, 4, -1), "out of range"),
        (lambda: make_sparse_int(torch.zeros(4, 16), mask, torch.ones(4, 1), None, 12, -1), "bits=12"),
    ]
    for fn, msg in cases:
        with pytest.raises(QuantkitError, match=msg):
            fn()


def kernel_cases():
    """(name, PackedLinear) for every CPU kernel path, with and without wrappers, odd shapes."""
    out_f, in_f = 72, 96
    W, mask = fp16_weight(out_f, in_f), random_mask(out_f, in_f)
    pre, post = blocks(in_f, 32, 1), blocks(out_f, 32, 2)
    cases = []
    for wrap in (False, True):
        kw = {"pre": pre, "post": post} if wrap else {}
        cases.append(("fp16", make_sparse(W, mask, **kw)))
        for bits, gs, sym in ((4, 32, False), (3, -1, True), (2, 32, True), (8, -1, False), (8, 32, True),
                              (4, 8, True), (8, 16, False), (6, 32, False)):
            codes, scales, zeros = grid(out_f, in_f, bits, gs, sym)
            cases.append((f"{bits}b g{gs}", make_sparse_int(codes, mask, scales, zeros, bits, gs, **kw)))
    return cases


def test_cpu_kernel_paths_match_reference():
    seen = set()
    x = torch.randn(3, 5, 96, generator=gen(7))
    bias = torch.randn(72, generator=gen(8))
    for name, p in kernel_cases():
        seen.add(core_path(p))
        assert select(p, "cpu").name == "cpu_sparse"
        ref = KERNELS["reference"].prepare(p, bias)(x)
        assert torch.allclose(ref, x @ p.dequantize().T + bias, rtol=1e-5, atol=1e-4)
        y = KERNELS["cpu_sparse"].prepare(p, bias)(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        assert (y - ref).norm() / ref.norm() < 1e-2, name
        assert KERNELS["cpu_sparse"].prepare(p, None)(x.bfloat16()).dtype == torch.bfloat16
    assert seen == {"int4", "int8", "bf16"}


def test_cuda_kernel_is_never_chosen_without_a_gpu():
    p = kernel_cases()[0][1]
    if not torch.cuda.is_available():
        assert not KERNELS["cuda_sparse"].supports(p)
        with pytest.raises(QuantkitError, match="does not support"):
            select(p, "cpu", "cuda_sparse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert select(p, "cuda").name == "reference"
    assert select(p, "cpu").name == "cpu_sparse"


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sparse_kinds(model):
    """One PackedLinear of a different kind per linear of the tiny llama (ragged wrappers included)."""
    kinds = [("fp16", None), ("fp16", 32), ("int", (4, 16, True, None)), ("int", (4, -1, False, 32)),
             ("int", (8, -1, True, None)), ("int", (3, 16, False, 16)), ("int", (2, 8, True, None))]
    packed = {}
    prefix, blks = find_blocks(model)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blks) for n in linears(b)]
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        mask = nm_mask(lin.weight.detach().abs())
        kind, opt = kinds[i % len(kinds)]
        if kind == "fp16":
            wrap = {} if opt is None else {"pre": blocks(in_f, opt, i), "post": blocks(out_f, opt, i + 50)}
            packed[name] = make_sparse(lin.weight.detach(), mask, **wrap)
        else:
            bits, gs, sym, b = opt
            codes, scales, zeros = grid(out_f, in_f, bits, gs, sym, seed=i)
            wrap = {} if b is None else {"pre": blocks(in_f, b, i), "post": blocks(out_f, b, i + 50)}
            packed[name] = make_sparse_int(codes, mask, scales * 0.1, zeros, bits, gs, **wrap)
    return packed


def test_tiny_model_saves_and_loads_with_equal_logits(tmp_path):
    model = tiny_model("llama")
    packed = sparse_kinds(model)
    assert len({(p.meta["bits"], p.meta["group_size"], p.meta["block_size"]) for p in packed.values()}) == 7
    with torch.no_grad():      # the dense model with the dequantized weights: what the oracle runs
        for name, p in packed.items():
            model.get_submodule(name).weight.copy_(p.dequantize())
    ids = token_batches(n=2, seqlen=24, batch=2, seed=1)[0]
    fake = outputs(model, ids)
    with atomic_dir(tmp_path / "q") as d:
        save_packed(d, model, packed, {})
    assert torch.equal(outputs(quantkit.load(tmp_path / "q", kernel="reference"), ids), fake)
    served = quantkit.load(tmp_path / "q")
    layers = [m for m in served.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(packed) and {m.kernel_name() for m in layers} == {"cpu_sparse"}
    assert all(m._released for m in layers)
    got = outputs(served, ids)
    assert (got - fake).norm() / fake.norm() < 1e-2
    from transformers import AutoModelForCausalLM
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), got)
    for name, p in packed.items():      # the same layers built in memory run the same numbers
        replace_linear(model, name, QuantLinear(p, model.get_submodule(name).bias))
    assert torch.equal(outputs(model, ids), got)
