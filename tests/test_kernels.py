"""Every kernel against PackedLinear.dequantize() on odd shapes, bits, groups and act-order."""
import warnings

import pytest
import torch

from quantkit.formats.packed import int_parts, make_int, make_levels
from quantkit.kernels import KERNELS, select
from quantkit.nn.qlinear import QuantLinear
from quantkit.quant.base import QSpec
from quantkit.quant.gptq import gptq_codes

SHAPES = [(48, 100), (64, 576), (200, 144)]


def packed_layer(out_f, in_f, bits, gs, act_order, static, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(500, in_f, generator=g) * (torch.rand(in_f, generator=g) + 0.1)
    spec = QSpec(bits=bits, group_size=gs, act_order=act_order, static_groups=static, mse=False)
    c, s, z, gi = gptq_codes(W, X.T @ X / 500, spec)[:4]
    return make_int(c, s, z, bits, gs, gi)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
def test_kernels_match_dequantize(shape, bits, gs):
    for act_order, static in ((False, True), (True, False)):
        p = packed_layer(*shape, bits, gs, act_order, static)
        if act_order and gs > 0 and gs < shape[1]:
            assert "g_idx" in p.tensors  # dynamic act-order groups need the column map
        bias = torch.randn(shape[0])
        x = torch.randn(3, 5, shape[1])
        ref = x @ p.dequantize().T + bias
        for name, k in KERNELS.items():
            if not k.supports(p) or name == "triton":   # tests/test_kernels_triton.py, tiny shapes
                continue
            y = k.prepare(p, bias)(x)
            tol = 1e-5 if name == "reference" else 1e-2
            assert y.shape == ref.shape
            assert (y - ref).norm() / ref.norm() < tol, name


def test_kernel_table_prefers_fast_paths_and_falls_back_once():
    assert select(packed_layer(64, 576, 3, 128, True, True), "cpu").name == "cpu_int4"
    assert select(packed_layer(64, 576, 8, -1, False, True), "cpu").name == "cpu_int8"
    assert select(packed_layer(64, 576, 8, 64, True, False), "cpu").name == "cpu_int8"
    int8 = packed_layer(64, 576, 8, 64, False, True)
    codes, scales, zeros, g_idx = int_parts(int8)
    levels = make_levels(codes, torch.full((576,), 256), scales, zeros, 8, 64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert select(levels, "cpu").name == "reference"
        select(levels, "cpu")
    assert len(w) == 1 and "reference kernel" in str(w[0].message)


def test_quantlinear_forced_reference_and_dtype():
    p = packed_layer(64, 576, 4, 64, False, True)
    ql = QuantLinear(p, None, kernel="reference")
    x = torch.randn(2, 576)
    assert ql.kernel_name() == "reference"
    assert torch.allclose(ql(x), x @ p.dequantize().T, rtol=1e-5, atol=1e-5)
    assert ql(x.bfloat16()).dtype == torch.bfloat16
