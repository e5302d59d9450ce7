"""Kernels for the "sparse" format: y = x @ Wᵀ = ((x·preᵀ) · Sᵀ) · postᵀ, wrappers per block.

CPU: torch has no CPU kernel that profits from 2:4 sparsity, so the core runs as a dense packed
layer: a quantized core becomes an "int" layer (pruned positions hold the zero-point code, so they
dequantize to exactly 0) run by kernels/cpu.py — int4 for <= 4 bits, int8 for 8 bits; an fp16 core
(or a grid those kernels cannot take: groups of 8/16, 5-7 bits) runs as a dense bf16 matmul of the
decompressed core. The wrappers run as one bmm over the blocks, in bf16 (bench/sparse_kernels.py,
one thread): fp32 wrappers are about 2x faster at batch 1 (saving 10-60 µs per wrapper) but up to 2x
slower at batch 64 on 1536+ dims and would double the wrappers' resident size; bf16 raises the
error against the oracle from 2.9e-3 (the core's own bf16 rounding) to 4.4e-3 relative.
CUDA: the core as torch's semi-structured sparse tensor (cuSPARSELt or CUTLASS), wrappers by bmm.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.formats.packed import PackedLinear, make_int
from quantkit.formats.packing import unpack
from quantkit.formats.sparse import block_diag_apply, kept_values, scatter_core, sparse_grid
from quantkit.kernels import cpu

Forward = Callable[[Tensor], Tensor]


def core_path(p: PackedLinear) -> str:
    """How the CPU kernel runs this layer's core: "int4", "int8" or "bf16" (dense decompressed)."""
    bits, gs = p.meta["bits"], p.meta["group_size"]
    probe = PackedLinear("int", p.shape, {}, {"bits": bits, "group_size": gs, "sym": p.meta["sym"]})
    if bits <= 4 and cpu.supports_int4(probe):
        return "int4"
    # one int8 call per group: groups narrower than 32 columns cost more than the dense matmul
    if bits == 8 and (gs <= 0 or gs >= 32):
        return "int8"
    return "bf16"


def as_int(p: PackedLinear) -> PackedLinear:
    """The quantized core as a dense "int" layer on the same grid; pruned positions hold the zero code."""
    scales, zeros, g = sparse_grid(p)
    bits, gs = p.meta["bits"], p.meta["group_size"]
    codes = unpack(p.tensors["qweight"], bits, g.numel())
    dense_zero = zeros.repeat_interleave(gs, dim=1)[:, :p.shape[1]] if gs > 0 else zeros.expand(p.shape)
    dense = scatter_core(p, codes, dense_zero.to(torch.int32))
    return make_int(dense, scales, None if p.meta["sym"] else zeros, bits, gs)


def dense_core(p: PackedLinear, dtype: torch.dtype) -> Tensor:
    """The decompressed core S [out, in] in `dtype` (pre/post not applied)."""
    return scatter_core(p, kept_values(p)).to(dtype)


def _transposed(p: PackedLinear, name: str, dtype: torch.dtype) -> Tensor | None:
    t = p.tensors.get(name)
    return None if t is None else t.transpose(1, 2).to(dtype).contiguous()


def _wrapped(core: Forward, pre_t: Tensor | None, post_t: Tensor | None, bias: Tensor | None,
             dtype: torch.dtype, in_f: int, out_f: int) -> Forward:
    """forward(x) = ((x·preᵀ) → core → ·postᵀ) + bias, the wrappers in `dtype`, result in x's dtype."""
    def forward(x: Tensor) -> Tensor:
        shape = x.shape
        h = x.reshape(-1, in_f)
        if pre_t is not None:
            h = block_diag_apply(pre_t, h.to(dtype), "right")
        h = core(h)
        if post_t is not None:
            h = block_diag_apply(post_t, h.to(dtype), "right")
        if bias is not None:
            h = h + bias
        return h.to(x.dtype).reshape(*shape[:-1], out_f)
    return forward


def supports_cpu(p: PackedLinear) -> bool:
    return p.format == "sparse"


def prepare_cpu(p: PackedLinear, bias: Tensor | None, wrapper_dtype: torch.dtype = torch.bfloat16) -> Forward:
    """forward(x) ≈ x @ p.dequantize()ᵀ + bias, bf16 activations (`wrapper_dtype` is for the bench)."""
    path = core_path(p)
    if path == "int4":
        core = cpu.prepare_int4(as_int(p), None)
    elif path == "int8":
        core = cpu.prepare_int8(as_int(p), None)
    else:
        w = dense_core(p, torch.bfloat16)
        core = lambda h: F.linear(h.to(torch.bfloat16), w)  # noqa: E731
    b = None if bias is None else bias.to(torch.bfloat16)
    return _wrapped(core, _transposed(p, "pre", wrapper_dtype), _transposed(p, "post", wrapper_dtype),
                    b, wrapper_dtype, *reversed(p.shape))


def _semi_structured_class():
    """torch's backend class for 2:4 tensors: cuSPARSELt where the build has it, else CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor as S
    if S._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def supports_cuda(p: PackedLinear) -> bool:
    """2:4 on a CUDA GPU of compute capability >= 8.0, with the backend's fp16 shape constraints met."""
    if p.format != "sparse" or (p.meta["n"], p.meta["m"]) != (2, 4) or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability() < (8, 0):
        return False
    # the sparse operand (the weight) must be a multiple of (sparse_min_rows, sparse_min_cols);
    # activations are padded by torch itself to the dense minimums
    c = _semi_structured_class()._DTYPE_SHAPE_CONSTRAINTS.get(torch.float16)
    out_f, in_f = p.shape
    return c is not None and out_f % c.sparse_min_rows == 0 and in_f % c.sparse_min_cols == 0


def prepare_cuda(p: PackedLinear, bias: Tensor | None) -> Forward:
    """Semi-structured fp16 core (cuSPARSELt or CUTLASS), fp16 activations and wrappers.

    Untested on a GPU so far (written against torch/sparse/semi_structured.py, torch 2.13); the
    kernel table only offers it for CUDA devices and supports() is False without a GPU.
    """
    dev = p.tensors["indices"].device
    w = _semi_structured_class().from_dense(dense_core(p, torch.float16).to(dev).contiguous())
    core = lambda h: F.linear(h.to(torch.float16).contiguous(), w)  # noqa: E731
    b = None if bias is None else bias.to(dev, torch.float16)
    return _wrapped(core, _transposed(p, "pre", torch.float16), _transposed(p, "post", torch.float16),
                    b, torch.float16, *reversed(p.shape))
