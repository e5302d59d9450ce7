"""QuaRot-style rotation (RSQ's first step): the fp model's function is unchanged, its weights
and residual-stream activations lose their outlier channels, so low-bit grids fit them better.

RMSNorm scales are folded into the linears that read them; then a seeded random Hadamard Q
(Hadamard · diag(±1) / √d) rotates the residual stream: x ↦ xQ commutes with a unit-weight
RMSNorm (the RMS is rotation invariant), readers absorb Q on their input side and writers Qᵀ
on their output side. A per-head Hadamard between v_proj and o_proj rotates the values.
The MLP's intermediate activations cannot be rotated offline (SwiGLU is elementwise), so, as
QuaRot and RSQ do, down_proj gets an online Hadamard: its input is multiplied at run time by
a fixed normalised Hadamard M (no random signs) and its weight by M, which leaves the product
unchanged and spreads the intermediate outliers before down_proj is quantized.

Hadamard matrices of order 2^k · m come from Sylvester doubling, Paley I (q prime, q ≡ 3 mod
4: order q + 1) and Paley II (q ≡ 1 mod 4: order 2(q + 1)) and Kronecker products of those,
which covers SmolLM2 (576 = 72 · 8, head 64) and the test models (80 = 79 + 1, head 20).
"""
from __future__ import annotations

import math
import warnings
from functools import cache

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError

# pre-norm decoders with RMSNorm whose blocks look like Llama's (same module names)
SUPPORTED = ("llama", "mistral", "qwen2")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0
    chi[[(x * x) % q for x in range(1, q)]] = 1
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> Tensor:
    # q ≡ 3 mod 4: Q is antisymmetric, S = [[0, 1ᵀ], [−1, Q]] is a skew conference matrix, H = I + S
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> Tensor:
    # q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix of order q + 1
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@cache
def _hadamard(n: int) -> Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    for d in range(2, math.isqrt(n) + 1):       # smallest factor first: Sylvester doubling
        if n % d == 0:
            a, b = _hadamard(d), _hadamard(n // d)
            if a is not None and b is not None:
                return torch.kron(a, b)
    return None


def hadamard(n: int) -> Tensor | None:
    """A ±1 matrix H of order n with H Hᵀ = n I (float64), or None if no construction is known."""
    H = _hadamard(n)
    return None if H is None else H.clone()


def random_orthogonal(n: int, seed: int) -> Tensor:
    """Seeded orthogonal Q [n, n] (float64): Hadamard · diag(random ±1) / √n, or QR fallback."""
    g = torch.Generator().manual_seed(seed)
    H = hadamard(n)
    if H is None:
        warnings.warn(f"no Hadamard construction of order {n}; using a random orthogonal matrix "
                      "(rotation still exact, outliers spread less evenly)", stacklevel=2)
        Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return Q * torch.sign(R.diagonal())[None, :]
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return H * signs[None, :] / math.sqrt(n)


def check_rotatable(model: nn.Module) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SUPPORTED:
        raise QuantkitError(f"RSQ rotation supports RMSNorm pre-norm decoders ({', '.join(SUPPORTED)}); "
                            f"{type(model).__name__} (model_type {kind!r}) is not one; use --method gptq "
                            "or set rsq.rotate: false")
    if model.get_output_embeddings() is None:
        raise QuantkitError(f"RSQ rotation needs a language-model head; {type(model).__name__} has none")


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight (and say so in the config) so the two can be rotated apart."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None:
        text.tie_word_embeddings = False


@torch.no_grad()
def _rotate_inputs(lin: nn.Linear, M: Tensor) -> None:
    """W ← W M: the linear now reads x' with x = x' M."""
    lin.weight.data = (lin.weight.data.double() @ M.to(lin.weight.device)).to(lin.weight.dtype)


@torch.no_grad()
def _rotate_outputs(lin: nn.Linear, M: Tensor) -> None:
    """W ← Mᵀ W, b ← Mᵀ b: the linear now writes y' = y M (row-vector convention)."""
    Mt = M.t().to(lin.weight.device)
    lin.weight.data = (Mt @ lin.weight.data.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (Mt @ lin.bias.data.double()).to(lin.bias.dtype)


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight into the linears that read its output; the norms become 1."""
    check_rotatable(model)
    untie_embeddings(model)
    inner = _decoder(model)

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        g = norm.weight.data.double()
        for lin in readers:   # W diag(g), by broadcasting
            lin.weight.data = (lin.weight.data.double() * g.to(lin.weight.device)).to(lin.weight.dtype)
        norm.weight.data.fill_(1.0)

    for block in inner.layers:
        a, m = block.self_attn, block.mlp
        fold(block.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        fold(block.post_attention_layernorm, [m.gate_proj, m.up_proj])
    fold(inner.norm, [model.get_output_embeddings()])


@torch.no_grad()
def _rotate_heads(attn: nn.Module, seed: int) -> None:
    """Per-head orthogonal map on the values, undone inside o_proj (exact for GQA too)."""
    hd = attn.head_dim
    Hh = random_orthogonal(hd, seed)
    n_kv = attn.v_proj.weight.shape[0] // hd
    n_q = attn.o_proj.weight.shape[1] // hd
    _rotate_outputs(attn.v_proj, torch.block_diag(*[Hh] * n_kv))
    _rotate_inputs(attn.o_proj, torch.block_diag(*[Hh] * n_q))


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """Orders (a, b), a·b = n, of known Hadamard constructions with a + b smallest: the online
    transform is H_a ⊗ H_b, applied as two small matmuls (n·(a + b) operations, not n²)."""
    pairs = [(a, n // a) for a in range(1, n + 1) if n % a == 0
             and _hadamard(a) is not None and _hadamard(n // a) is not None]
    return min(pairs, key=sum) if pairs else None


class OnlineHadamard:
    """x ↦ x·(H_a ⊗ H_b)/√(ab) over the last dimension (an orthogonal map, its own inverse up to
    transposition); the factors are cast once per device and dtype."""

    def __init__(self, a: int, b: int):
        self.a, self.b = a, b
        self._cache: dict = {}

    def matrix(self) -> Tensor:
        """The dense orthogonal matrix M (float64) the transform multiplies by."""
        return torch.kron(_hadamard(self.a), _hadamard(self.b)) / math.sqrt(self.a * self.b)

    def __call__(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple((_hadamard(k) / math.sqrt(k)).to(x.device, x.dtype) for k in (self.a, self.b))
        A, B = self._cache[key]
        X = x.reshape(*x.shape[:-1], self.a, self.b)
        return (A.t() @ X @ B).reshape(x.shape)   # (X (A ⊗ B)) as row vector = Aᵀ X B as a·b matrix


@torch.no_grad()
def add_online_hadamard(lin: nn.Linear, hook: bool = True) -> None:
    """W ← W M and x ↦ x M at run time (M orthogonal): same outputs, outliers spread.
    hook=False: the weight only (a streamed block read again from the file, which has the
    run-time transform from its first read)."""
    ab = hadamard_factors(lin.weight.shape[1])
    if ab is None:
        warnings.warn(f"no Hadamard of order {lin.weight.shape[1]}: no online Hadamard there", stacklevel=2)
        return
    fn = OnlineHadamard(*ab)
    _rotate_inputs(lin, fn.matrix())
    if hook:
        lin.input_hadamard = list(ab)    # the pipeline copies it into the layer's packed metadata
        lin.register_forward_pre_hook(lambda _m, args: (fn(args[0]), *args[1:]))


@torch.no_grad()
def rotate_block(block: nn.Module, seed: int, index: int, hooks: bool = True) -> None:
    """rotate_model(residual=False) for one block (the `index`-th): its values rotated per
    head, an online Hadamard on the input of each of its linears (hooks=False: on the weights
    only, see add_online_hadamard). Nothing outside it changes."""
    a, m = block.self_attn, block.mlp
    _rotate_heads(a, seed + 1 + index)
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
        add_online_hadamard(lin, hooks)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online: bool = True, residual: bool = True) -> None:
    """Fuse the norms and rotate the residual stream and the values in place; logits unchanged.

    online: also the online Hadamard before every down_proj (a run-time hook; checkpoints
    record it in the layer's metadata and loaders install it again).
    residual=False: the residual stream, the norms, the embeddings and the head stay as they
    are (a tied lm_head stays tied, so the checkpoint stores one vocabulary matrix, not two);
    instead every linear of every block gets an online Hadamard on its input, and the values
    are rotated per head as before. The weights GPTQ sees are as incoherent either way."""
    if not residual:
        check_rotatable(model)
        for i, block in enumerate(_decoder(model).layers):
            rotate_block(block, seed, i)
        return
    fuse_norms(model)
    inner = _decoder(model)
    emb = model.get_input_embeddings()
    Q = random_orthogonal(emb.weight.shape[1], seed)
    emb.weight.data = (emb.weight.data.double() @ Q.to(emb.weight.device)).to(emb.weight.dtype)
    for i, block in enumerate(inner.layers):
        a, m = block.self_attn, block.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _rotate_inputs(lin, Q)
        for lin in (a.o_proj, m.down_proj):
            _rotate_outputs(lin, Q)
        _rotate_heads(a, seed + 1 + i)
        if online:
            add_online_hadamard(m.down_proj)
    _rotate_inputs(model.get_output_embeddings(), Q)
