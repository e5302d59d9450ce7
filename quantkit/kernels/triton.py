"""Fused dequantize + matmul Triton kernels for the "int" format (GPU inference).

Layout, built once by `prepare` on the weight's device (N = out features, K = in features):
  qweight [ceil(K / P), N] int32: P = 32 // bits codes per word (3-bit: 10, top 2 bits unused),
      code k sits in word k // P at bits [(k % P)·bits, …). K-major, so a tile's loads along N
      are coalesced.
  scale, shift [G, N] fp32: W[k, n] = q·scale[g, n] + shift[g, n], shift = -zero·scale, so the
      inner loop is one fma per weight.
  g_idx [K] int32: the group of each input column. Scales are gathered per column, so act-order
      (arbitrary g_idx), groups that do not divide K and one group per row need no special case.
Small M (≤ 8 rows) runs a split-K GEMV (broadcast multiply + tl.sum, fp32 atomics into a zeroed
buffer); larger M runs a tiled tl.dot GEMM. Both accumulate in fp32.

Under TRITON_INTERPRET=1 (CPU tests) each kernel gets one small config. @triton.jit picks the
interpreter when it decorates (triton's own library at `import triton`, these kernels at import of
this module), so the variable must be set before triton is first imported in the process.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from quantkit.formats.packed import PackedLinear, int_parts

try:
    import triton
    import triton.language as tl
except ImportError:  # CI machines without triton: the module imports, supports() says no
    triton = None

_BITS = (2, 3, 4, 8)
_GEMV_MAX_M = 8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def supports(p: PackedLinear) -> bool:
    """True when triton is importable and p is an "int" record of 2, 3, 4 or 8 bits."""
    return triton is not None and p.format == "int" and p.meta["bits"] in _BITS


def _pack_k(codes: Tensor, bits: int) -> Tensor:
    """Codes [N, K] -> int32 words [ceil(K/P), N], P = 32 // bits codes per word along K."""
    per = 32 // bits
    n, k = codes.shape
    kw = -(-k // per)
    c = torch.zeros(kw * per, n, dtype=torch.int64, device=codes.device)
    c[:k] = codes.t().to(torch.int64)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c.reshape(kw, per, n) << shifts[None, :, None]).sum(1)
    # reinterpret the low 32 bits as signed int32 (8-bit codes reach bit 31)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


if triton is not None:
    @triton.jit
    def _dequant(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K,
                 BITS: tl.constexpr, PER: tl.constexpr):
        """fp32 weight tile [len(offs_k), len(offs_n)]; 0 outside K x N."""
        k_ok = offs_k < K
        mask = k_ok[:, None] & (offs_n[None, :] < N)
        # each word is loaded P times (once per code): the repeats hit L1, and it keeps 3-bit simple
        words = tl.load(w_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        gn = g[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + gn, mask=mask, other=0.0)
        shift = tl.load(z_ptr + gn, mask=mask, other=0.0)
        return q.to(tl.float32) * scale + shift

    def _gemv_prune(configs, named_args, **kwargs):
        """Drop configs whose [BLOCK_M, BLOCK_K, BLOCK_N] product would spill registers."""
        bm, k = kwargs["BLOCK_M"], named_args["K"]
        # 32 products per thread already take ~170 registers on sm_90 (tile, codes, scales)
        ok = [c for c in configs
              if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps
              and c.kwargs["SPLIT_K"] <= max(1, triton.cdiv(k, c.kwargs["BLOCK_K"]))]
        return ok or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]

    def _gemm_prune(configs, named_args, **kwargs):
        """Drop configs whose BLOCK_M is much taller than the batch."""
        m = max(16, named_args["M_BUCKET"])
        return [c for c in configs if c.kwargs["BLOCK_M"] <= m] or configs[:1]

    def _gemv_configs():
        if _INTERPRET:  # SPLIT_K 2 so that the CPU tests cover the atomic split-K path
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=1)]
        # (BLOCK_N, BLOCK_K, SPLIT_K, warps): big slabs for M = 1, smaller ones for M up to 8;
        # split-K keeps H100's 132 SMs busy when N / BLOCK_N is small
        shapes = [(64, 64, 1, 4), (64, 64, 4, 4), (128, 64, 8, 8), (64, 128, 8, 8), (256, 32, 4, 8),
                  (64, 32, 8, 4), (32, 64, 8, 4), (32, 32, 4, 4), (64, 32, 8, 8), (32, 32, 8, 8)]
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w)
                for n, k, s, w in shapes]

    def _gemm_configs():
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                                  num_warps=1)]
        # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): BLOCK_K 32 and 8 warps for big tiles, as the
        # dequantized tile and its gathered scales cost registers (none of these spill on sm_90)
        shapes = [(16, 64, 32, 4, 4), (16, 128, 32, 4, 4), (32, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                  (64, 64, 64, 8, 3), (64, 128, 32, 8, 4), (128, 64, 32, 8, 4), (128, 128, 32, 8, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                              num_warps=w, num_stages=s) for m, n, k, w, s in shapes]

    @triton.autotune(configs=_gemv_configs(), key=["N", "K", "BLOCK_M"], reset_to_zero=["out_ptr"],
                     prune_configs_by={"early_config_prune": _gemv_prune})
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K, stride_xm,
                     BITS: tl.constexpr, PER: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """out[M, N] (fp32, zeroed) += x[M, K] @ W[K, N] over this program's K slice."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # whole tiles per slice
        k_lo = pid_k * k_span
        k_hi = tl.minimum(k_lo + k_span, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _dequant(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, BITS, PER)
            xm = (offs_m[:, None] < M) & (offs_k[None, :] < k_hi)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xm, other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        n_ok = offs_n < N
        if pid_k == 0:  # the bias once, from the first K slice
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(out, acc, mask=(offs_m[:, None] < M) & n_ok[None, :])

    @triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"],
                     prune_configs_by={"early_config_prune": _gemm_prune})
    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K, stride_xm, M_BUCKET,
                     BITS: tl.constexpr, PER: tl.constexpr, DOT_PREC: tl.constexpr,
                     DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out[M, N] = x[M, K] @ W[K, N] + b, one BLOCK_M x BLOCK_N tile per program."""
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # GROUP_M row blocks walk the N tiles together, so neighbouring programs read the
        # same packed W tiles from L2
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        rows = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M·K can pass 2^31
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xm, other=0.0)
            w = _dequant(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, BITS, PER).to(x.dtype)
            if DOT_F32:  # exact upcast: same products as a bf16 dot with fp32 accumulation
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        n_ok = offs_n < N
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def prepare(p: PackedLinear, bias: Tensor | None):
    """Repack p once into the K-major layout above; forward(x) = x @ Wᵀ + bias in x's dtype."""
    if not supports(p):
        raise ValueError(f"triton kernel does not support {p.format} {p.meta}")
    codes, scales, zeros, g_idx = int_parts(p)
    out_f, in_f = p.shape
    bits = p.meta["bits"]
    w = _pack_k(codes, bits)
    s = scales.t().contiguous()
    z = (-zeros * scales).t().contiguous()
    g = g_idx.to(torch.int32).contiguous()
    b = torch.zeros(out_f, device=w.device) if bias is None else bias.to(w.device, torch.float32)
    args = (w, s, z, g, b.contiguous())
    consts = {"BITS": bits, "PER": 32 // bits}

    def forward(x: Tensor) -> Tensor:
        if not (x.is_cuda or _INTERPRET):
            raise RuntimeError("the triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f)
        x2 = x2 if x2.dtype in _DTYPES else x2.float()
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, out_f)
        run = _gemv if x2.shape[0] <= _GEMV_MAX_M else _gemm
        # triton launches on the current device: make it x's (layers spread over several GPUs)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            y = run(x2, args, consts, out_f)
        return y.to(x.dtype).reshape(*lead, out_f)
    return forward


def _gemv(x: Tensor, args: tuple, consts: dict, n: int) -> Tensor:
    """Small-M path: fp32 result [M, N]."""
    m, k = x.shape
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32)  # split-K atomics add into it
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _gemv_kernel[grid](x, *args, out, m, n, k, x.stride(0),
                       BLOCK_M=triton.next_power_of_2(m), **consts)
    return out


def _gemm(x: Tensor, args: tuple, consts: dict, n: int) -> Tensor:
    """Large-M path: result [M, N] in x's dtype."""
    m, k = x.shape
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    # tune per power-of-two batch bucket, not per sequence length
    bucket = min(triton.next_power_of_2(m), 1024)
    # fp32 activations: 3-pass TF32 is near fp32 accuracy on tensor cores; "ieee" spills registers
    prec = "tf32x3" if x.dtype == torch.float32 else "tf32"
    # triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits: go fp32 there
    dot_f32 = _INTERPRET and x.dtype == torch.bfloat16
    _gemm_kernel[grid](x, *args, out, m, n, k, x.stride(0), bucket, DOT_PREC=prec, DOT_F32=dot_f32,
                       **consts)
    return out
