"""Triton "int" kernels against PackedLinear.dequantize(), run on CPU by triton's interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is first imported in the process
(@triton.jit picks the interpreter when it decorates): tests/conftest.py sets it for the whole
session; this module sets it too when run alone, and skips if triton came in earlier without it.
Shapes are tiny: the interpreter runs each program in numpy.
"""
import importlib.util
import os
import sys

_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if _LATE:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: set it in conftest.py",
                allow_module_level=True)

import quantkit.kernels.triton as kt  # noqa: E402
from quantkit.formats.packed import PackedLinear, make_int  # noqa: E402
from quantkit.formats.packing import pack  # noqa: E402
from tests.test_kernels import packed_layer  # noqa: E402

assert kt._INTERPRET  # triton came in after the variable was set, so did this module

CASES = [(shape, bits, gs) for shape in [(48, 100), (40, 144)] for bits in (2, 3, 4, 8)
         for gs in (32, 64, -1)] + [((40, 144), bits, 128) for bits in (2, 3, 4, 8)]
# M = 1 and M = 6 (as [2, 3, in]) take the GEMV kernel, M = 17 the tl.dot GEMM kernel
BATCHES = [(1,), (2, 3), (17,)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def check(p: PackedLinear, bias, dtypes, tol, seed=0):
    """Run every batch shape in every dtype through the kernel and compare with the oracle."""
    g = torch.Generator().manual_seed(seed)
    fwd = kt.prepare(p, bias)
    W = p.dequantize()
    for lead in BATCHES:
        for dtype in dtypes:
            x = torch.randn(*lead, p.shape[1], generator=g).to(dtype)
            ref = x.float() @ W.T + (0 if bias is None else bias)
            y = fwd(x)
            assert y.dtype == dtype and y.shape == (*lead, p.shape[0])
            assert rel_err(y, ref) < tol, (lead, dtype, rel_err(y, ref))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,bits,gs", CASES)
def test_matches_dequantize_fp16_bf16(shape, bits, gs, act_order):
    p = packed_layer(*shape, bits, gs, act_order, static=False)
    if act_order and 0 < gs < shape[1]:
        assert "g_idx" in p.tensors  # arbitrary column -> group map is exercised
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    check(p, bias, (torch.float16, torch.bfloat16), 1e-2)


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, -1)])
def test_fp32_without_bias_is_tight(bits, gs):
    check(packed_layer(40, 144, bits, gs, True, False), None, (torch.float32,), 1e-5)


@pytest.mark.parametrize("bits", [3, 8])
def test_symmetric_layer_without_stored_zeros(bits):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 1 << bits, (33, 72), generator=g)
    scales = torch.rand(33, 3, generator=g) + 0.05
    p = make_int(codes, scales, None, bits, 32)
    assert "qzeros" not in p.tensors
    check(p, torch.randn(33, generator=g), (torch.float16,), 1e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_k_layout(bits):
    codes = torch.randint(0, 1 << bits, (5, 23), generator=torch.Generator().manual_seed(bits))
    words = kt._pack_k(codes, bits).to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    assert words.shape == (-(-23 // per), 5)
    k = torch.arange(23)
    back = (words[k // per] >> ((k % per) * bits)[:, None]) & ((1 << bits) - 1)
    assert torch.equal(back.t(), codes)


def test_supports():
    p = packed_layer(48, 100, 4, 32, False, True)
    assert kt.supports(p)
    five = PackedLinear("int", p.shape, {**p.tensors, "qweight": pack(torch.zeros(48, 100), 5)},
                        {**p.meta, "bits": 5})
    assert not kt.supports(five)
    assert not kt.supports(PackedLinear("int-levels", p.shape, p.tensors, p.meta))


def test_empty_batch_and_cpu_guard(monkeypatch):
    p = packed_layer(48, 100, 4, 32, False, True)
    fwd = kt.prepare(p, None)
    assert fwd(torch.zeros(0, 100, dtype=torch.float16)).shape == (0, 48)
    monkeypatch.setattr(kt, "_INTERPRET", False)  # compiled kernels cannot read CPU tensors
    with pytest.raises(RuntimeError, match="CUDA"):
        fwd(torch.zeros(1, 100, dtype=torch.float16))


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_kt_without_triton", kt.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a separate copy: kt keeps its kernels
    assert mod.triton is None
    assert not mod.supports(packed_layer(48, 100, 4, 32, False, True))
