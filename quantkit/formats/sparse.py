"""The "sparse" format: N:M semi-structured weights (2:4 first), optionally quantized, optionally
wrapped by ARMOR's block-diagonal matrices: W = blockdiag(post) @ S @ blockdiag(pre).

S, the sparse core [out, in], keeps n of every m consecutive input columns. Stored tensors:
  indices  int32 [out, words]  position 0..m-1 of each kept value inside its group of m, in column
           order, ceil(log2 m) bits each, packed with formats/packing.pack along the row: a little-
           endian bit stream, so for 2:4 each group is one nibble (first index in the low 2 bits),
           eight groups (32 dense columns) per word: the metadata layout of GPU sparse tensor cores
           before their tile swizzle. 1 bit per dense weight for 2:4.
  values   fp16 [out, in·n/m]  the kept values in column order (meta bits = 16), or when quantized:
  qweight  int32  b-bit codes of the kept values, packed along the compressed [out, in·n/m] matrix
  scales   fp16 [out, G]  per group of `group_size` DENSE input columns (contiguous; group_size % m
           == 0, so compressed position k is in group k // (group_size·n/m))
  qzeros   int32  packed zero points [out, G], asymmetric only (symmetric: zero = 2**(bits-1))
  pre      fp16 [ceil(in/b), b, b]   optional input-side blocks; post fp16 [ceil(out/b), b, b]
           output-side blocks. Ragged sizes: blockdiag(...) is cropped to d×d, so only the last
           block's top-left r×r part counts (the rest is stored as zeros).
meta: n, m, bits (16 = fp16 values), group_size (-1 for fp16 values), sym, block_size (0: no wrappers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, n_groups, register_format
from quantkit.formats.packing import pack, unpack


def is_nm(mask: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive input columns holds exactly n kept weights."""
    out_f, in_f = mask.shape
    return in_f % m == 0 and bool((mask.reshape(out_f, in_f // m, m).sum(-1) == n).all())


def index_bits(m: int) -> int:
    """Bits per stored index: enough for positions 0..m-1 (2 for m = 4)."""
    return max(1, (m - 1).bit_length())


def block_diag_apply(blocks: Tensor, X: Tensor, side: str) -> Tensor:
    """blockdiag(blocks)[:d,:d] @ X (side="left", d = X.shape[0]) or X @ blockdiag(blocks)[:d,:d]
    (side="right", d = X.shape[-1]), batched over the blocks; the d×d matrix is never formed."""
    nb, b, _ = blocks.shape
    d = X.shape[0] if side == "left" else X.shape[-1]
    if side not in ("left", "right") or -(-d // b) != nb:
        raise QuantkitError(f"block_diag_apply: {nb} blocks of {b} cannot cover dimension {d} on side "
                            f"{side!r}; pass ceil(d/b) blocks and side 'left' or 'right'")
    B = blocks.to(X.dtype)
    pad = nb * b - d
    if side == "left":
        X2 = X.reshape(d, -1)
        X2 = F.pad(X2, (0, 0, 0, pad)) if pad else X2             # zero rows meet the padding
        Y = torch.bmm(B, X2.reshape(nb, b, -1)).reshape(nb * b, -1)
        return (Y[:d] if pad else Y).reshape(X.shape)
    X2 = X.reshape(-1, d)
    X2 = F.pad(X2, (0, pad)) if pad else X2
    Y = torch.bmm(X2.reshape(-1, nb, b).transpose(0, 1), B)          # [nb, rows, b]
    Y = Y.transpose(0, 1).reshape(-1, nb * b)
    return (Y[:, :d] if pad else Y).reshape(X.shape)


def _check_core(shape: tuple[int, ...], mask: Tensor, n: int, m: int) -> None:
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        raise QuantkitError(f"sparse: mask shape {tuple(mask.shape)} differs from weight shape "
                            f"{tuple(shape)}; pass one bool mask per weight")
    if not 0 < n < m:
        raise QuantkitError(f"sparse: pattern {n}:{m} needs 0 < n < m (e.g. 2:4)")
    if mask.shape[1] % m:
        raise QuantkitError(f"sparse: {mask.shape[1]} input features is not a multiple of m={m}; "
                            "an N:M layer needs whole groups (leave this layer dense)")
    if not is_nm(mask.bool(), n, m):
        raise QuantkitError(f"sparse: the mask does not keep exactly {n} of every {m} consecutive "
                            f"input columns; build it with prune.mask.nm_mask(scores, {n}, {m})")


def _wrapper(blocks: Tensor | None, d: int, name: str) -> Tensor | None:
    """Blocks as stored: fp16, contiguous, the unused part of a ragged last block zeroed."""
    if blocks is None:
        return None
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or -(-d // blocks.shape[1]) != blocks.shape[0]:
        raise QuantkitError(f"sparse: {name} has shape {tuple(blocks.shape)}; for dimension {d} it "
                            f"must be [ceil({d}/b), b, b] (square blocks, padded to b×b)")
    out = blocks.detach().to(torch.float16).clone()
    r = d - (out.shape[0] - 1) * out.shape[1]
    out[-1, r:, :] = 0
    out[-1, :, r:] = 0
    return out.contiguous()


def _wrapper_tensors(shape: tuple[int, int], pre: Tensor | None, post: Tensor | None) -> tuple[dict, int]:
    out_f, in_f = shape
    tensors = {k: v for k, v in (("pre", _wrapper(pre, in_f, "pre")), ("post", _wrapper(post, out_f, "post")))
               if v is not None}
    sizes = {t.shape[1] for t in tensors.values()}
    if len(sizes) > 1:
        raise QuantkitError(f"sparse: pre and post blocks differ in size ({sorted(sizes)}); use one block size")
    return tensors, (sizes.pop() if sizes else 0)


def _kept(X: Tensor, mask: Tensor, n: int, m: int) -> Tensor:
    """The entries of X at the mask's kept positions, row by row in column order: [out, in·n/m]."""
    return X[mask.bool()].reshape(X.shape[0], X.shape[1] * n // m)


def _index_tensor(mask: Tensor, n: int, m: int) -> Tensor:
    pos = (torch.arange(mask.shape[1], device=mask.device) % m).expand(mask.shape)
    return pack(_kept(pos, mask, n, m), index_bits(m))


def make_sparse(W: Tensor, mask: Tensor, n: int = 2, m: int = 4, pre: Tensor | None = None,
                post: Tensor | None = None) -> PackedLinear:
    """N:M sparse core with fp16 kept values (W at pruned positions is ignored), optional wrappers."""
    _check_core(tuple(W.shape), mask, n, m)
    shape = tuple(W.shape)
    wrappers, b = _wrapper_tensors(shape, pre, post)
    tensors = {"indices": _index_tensor(mask, n, m),
               "values": _kept(W.detach(), mask, n, m).to(torch.float16).contiguous(), **wrappers}
    meta = {"n": n, "m": m, "bits": 16, "group_size": -1, "sym": True, "block_size": b}
    return PackedLinear("sparse", shape, tensors, meta)


def make_sparse_int(codes: Tensor, mask: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                    group_size: int, n: int = 2, m: int = 4, pre: Tensor | None = None,
                    post: Tensor | None = None) -> PackedLinear:
    """N:M sparse core with affine b-bit kept values (q - zero[g])·scale[g], g the dense column's group.

    Codes at pruned positions are ignored; `zeros` None means symmetric (zero = 2**(bits-1)).
    """
    _check_core(tuple(codes.shape), mask, n, m)
    out_f, in_f = shape = tuple(codes.shape)
    if not 1 <= bits <= 8:
        raise QuantkitError(f"sparse: bits={bits} is not supported; use 1..8 (or make_sparse for fp16)")
    if group_size != -1 and (group_size <= 0 or group_size % m):
        raise QuantkitError(f"sparse: group_size={group_size} must be -1 or a positive multiple of m={m} "
                            "so that no group of m straddles two quantization groups")
    G = n_groups(in_f, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != (out_f, G):
            raise QuantkitError(f"sparse: {name} has shape {tuple(t.shape)}, expected [{out_f}, {G}] "
                                f"for {in_f} inputs in groups of {group_size}")
    kept = _kept(codes.to(torch.int64), mask, n, m)
    for name, t in (("codes", kept), ("zeros", zeros)):
        if t is not None and t.numel() and (t.min() < 0 or t.max() >= 1 << bits):
            raise QuantkitError(f"sparse: {name} out of range for {bits} bits; expected integers in "
                                f"[0, {(1 << bits) - 1}]")
    wrappers, b = _wrapper_tensors(shape, pre, post)
    tensors = {"indices": _index_tensor(mask, n, m), "qweight": pack(kept, bits),
               "scales": scales.to(torch.float16).contiguous()}
    if zeros is not None:
        tensors["qzeros"] = pack(zeros.to(torch.int64), bits)
    meta = {"n": n, "m": m, "bits": bits, "group_size": group_size, "sym": zeros is None, "block_size": b}
    return PackedLinear("sparse", shape, {**tensors, **wrappers}, meta)


def kept_columns(p: PackedLinear) -> Tensor:
    """Dense column (long) of every kept value: [out, in·n/m]."""
    n, m = p.meta["n"], p.meta["m"]
    k = p.shape[1] * n // m
    idx = unpack(p.tensors["indices"], index_bits(m), k).long()
    return torch.arange(k, device=idx.device) // n * m + idx


def sparse_grid(p: PackedLinear) -> tuple[Tensor, Tensor, Tensor]:
    """Scales fp32 [out,G], zeros fp32 [out,G] and each compressed column's group (long) of a quantized core."""
    bits, n, m, gs = p.meta["bits"], p.meta["n"], p.meta["m"], p.meta["group_size"]
    scales = p.tensors["scales"].float()
    if "qzeros" in p.tensors:
        zeros = unpack(p.tensors["qzeros"], bits, scales.shape[1]).float()
    else:
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    k = torch.arange(p.shape[1] * n // m, device=scales.device)
    return scales, zeros, (torch.zeros_like(k) if gs <= 0 else k // (gs * n // m))


def kept_values(p: PackedLinear) -> Tensor:
    """The kept values of the core, fp32 [out, in·n/m] (dequantized when quantized)."""
    if p.meta["bits"] == 16:
        return p.tensors["values"].float()
    scales, zeros, g = sparse_grid(p)
    codes = unpack(p.tensors["qweight"], p.meta["bits"], g.numel()).float()
    return (codes - zeros[:, g]) * scales[:, g]


def scatter_core(p: PackedLinear, kept: Tensor, fill: Tensor | float = 0.0) -> Tensor:
    """A dense [out, in] tensor holding `kept` at the kept positions and `fill` elsewhere."""
    base = torch.empty(p.shape, dtype=kept.dtype, device=kept.device)
    base.copy_(fill if isinstance(fill, Tensor) else torch.tensor(fill, dtype=kept.dtype))
    return base.scatter_(1, kept_columns(p).to(kept.device), kept)


def sparse_core(p: PackedLinear) -> tuple[Tensor, Tensor]:
    """The dense fp32 core S [out, in] and its bool mask."""
    vals = kept_values(p)
    mask = scatter_core(p, torch.ones_like(vals, dtype=torch.bool), False)
    return scatter_core(p, vals), mask


@register_format("sparse")
def _dequantize_sparse(p: PackedLinear) -> Tensor:
    W, _ = sparse_core(p)
    if "pre" in p.tensors:
        W = block_diag_apply(p.tensors["pre"].float(), W, "right")
    if "post" in p.tensors:
        W = block_diag_apply(p.tensors["post"].float(), W, "left")
    return W


def wrapper_overhead(layers: dict, wrap: dict[str, int]) -> dict:
    """Extra parameters and FLOPs of block-diagonal wrappers (`wrap`: layer -> stored wrapper
    parameters, padding included; `layers`: the manifest's entries, with shape, n and m)."""
    dense = sum(layers[n]["shape"][0] * layers[n]["shape"][1] for n in wrap)
    core = sum(layers[n]["shape"][0] * layers[n]["shape"][1] * layers[n]["n"] / layers[n]["m"] for n in wrap)
    params = sum(wrap.values())
    return {"wrapped_layers": len(wrap), "wrapper_params": params, "wrapper_params_over_dense": params / dense,
            "wrapper_flops_per_token": 2 * params, "wrapper_flops_over_core": params / core,
            "wrapped_flops_over_dense": (core + params) / dense}
