"""Architecture-agnostic discovery of the repeated blocks and their linear layers."""
from __future__ import annotations

from torch import nn

from quantkit.errors import QuantkitError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_linear(m: nn.Module) -> bool:
    """A dense layer quantkit can quantize: nn.Linear, or GPT-2's transposed Conv1D."""
    return isinstance(m, LINEAR_TYPES) or getattr(m, "_quantkit_linear", False)


def linears(module: nn.Module) -> dict[str, nn.Module]:
    """Linear layers below `module`, by qualified name, in registration order."""
    return {n: m for n, m in module.named_modules() if n and is_linear(m)}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks holding most of the linear parameters.

    Decoder layers of Llama/Mistral/Qwen2/Gemma/OPT/GPT-2 and BERT's encoder layers all
    have this shape; no per-family table is needed.
    """
    best, best_size = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) != 1:
            continue
        size = sum(l.weight.numel() for b in m for l in linears(b).values())
        if size > best_size:
            best, best_size = (name, m), size
    if best is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise QuantkitError(f"unsupported architecture {type(model).__name__}: no repeated blocks "
                            f"of linear layers among its modules ({', '.join(kinds[:12]) or 'none'}"
                            f"{', ...' if len(kinds) > 12 else ''}); supported: decoder LMs such as "
                            "Llama, Mistral, Qwen2, Gemma, OPT, GPT-2, BERT-style encoders, and "
                            "image classifiers with BatchNorm")
    return best


def weight_matrix(m: nn.Module):
    """The weight as [out, in] (Conv1D stores it transposed)."""
    return m.weight.t() if Conv1D and isinstance(m, Conv1D) else m.weight


def set_weight_matrix(m: nn.Module, W) -> None:
    """Write an [out, in] weight back in the module's own layout."""
    W = W.t() if Conv1D and isinstance(m, Conv1D) else W
    m.weight.data.copy_(W.to(m.weight.dtype))


# Linears that serving engines (vLLM, GPTQModel) fuse into one matmul, so they need one scheme.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_groups(names: list[str]) -> list[list[str]]:
    """Partition layer names into fused sibling groups (q/k/v, gate/up); others stand alone."""
    groups, seen = [], set()
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        family = next((f for f in FUSED if leaf in f), (leaf,))
        members = [n for n in (f"{parent}.{m}" if parent else m for m in family) if n in names]
        members = members if name in members else [name]
        seen.update(members)
        groups.append(members)
    return groups
