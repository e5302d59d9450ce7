"""Sensitivities: the cost table cost[layer, option] and size[layer, option], built block by block.

`hessian`: the layer proxy tr((W - Q) H (W - Q)ᵀ) with Q the layer quantized at the option.
`trace`:   HAWQ-V3: Tr(∇²_W loss)/n · ||W - Q||², the trace by Hutchinson (stats/hutchinson.py).
`kl`:      ZeroQ/AdaQuant: KL(model ‖ model with only this layer quantized) on calibration tokens.
`fisher`:  the same error weighted per output channel by the diagonal Fisher of the model's
           loss w.r.t. that layer's outputs, E[(∂loss/∂y_o)²]: ½ δyᵀ F δy is the second-order
           loss increase, so layers whose outputs the loss barely sees (or strongly sees, like
           the last blocks' down-projections that write straight into the logits) are priced
           accordingly. The plain proxy treats every output unit of every layer alike.
           F and the H it weighs leave out each window's first position: that token is the
           attention sink, whose inputs are tens of times larger than any other token's while
           its errors barely reach the loss; a price that keeps it (the separable form
           Σ_o F_o (E H Eᵀ)_oo assumes a token's gradient and its input error independent)
           overprices v_proj and down_proj ~5x against the measured loss increase
           (bench/price_check.py).
"""
from __future__ import annotations

import tempfile
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantkit import registry
from quantkit.alloc.table import CostTable
from quantkit.model.discovery import linears, set_weight_matrix, weight_matrix
from quantkit.model.discovery import find_blocks
from quantkit.model.runner import (BlockInputs, Offload, block_devices, bring_block, capture_inputs,
                                   forward_block, input_groups, on_device, put_back, run_block, walk_blocks,
                                   whole_model_on)
from quantkit.model.stream import available_memory, streamed, trim_heap
from quantkit.stats.hessian import collect_hessians, proxy_loss
from quantkit.stats.hutchinson import loss_hessian_traces
from quantkit.types import QSpec


SINK = 1   # leading positions of every window a fisher price leaves out (the attention sink)


def output_fisher(model: nn.Module, batches: list[Tensor], names: list[str],
                  device: torch.device = torch.device("cpu"), progress: bool = False) -> dict[str, Tensor]:
    """Mean squared gradient of the next-token loss w.r.t. each named linear's outputs [out],
    one block at a time, each on its device (see _blockwise_fisher)."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:                        # only the activations' gradients are wanted
        p.requires_grad_(False)
    try:
        return _blockwise_fisher(model, batches, names, device, progress)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


LOSS_CHUNK = 128   # positions whose logits exist at once: [B, 128, vocab], not [B, T, vocab]


def _head_loss_grad(model: nn.Module, final: Tensor, ids: Tensor) -> Tensor:
    """∂/∂final of the summed next-token cross-entropy of the logits head(final), `final` being
    the base model's output (after its last norm). The head runs on LOSS_CHUNK positions at a
    time: a window's logits in fp32 (and their softmax and gradient) would otherwise be the
    largest tensors of a large-vocabulary model's pass."""
    head = model.get_output_embeddings()
    h = final.detach().requires_grad_(True)
    T = ids.shape[1]
    for a in range(0, T - 1, LOSS_CHUNK):
        b = min(a + LOSS_CHUNK, T - 1)                 # positions a..b-1 predict ids a+1..b
        logits = head(h[:, a:b]).float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, a + 1:b + 1].reshape(-1),
                        reduction="sum").backward()
    return h.grad


def _squares(g: Tensor) -> Tensor:
    """Σ over tokens of g² per output [out], every window's first position (the sink) left out."""
    g = g.detach().float()[:, SINK:]
    return (g * g).reshape(-1, g.shape[-1]).sum(0)


def _blockwise_fisher(model: nn.Module, batches: list[Tensor], names: list[str],
                      device: torch.device, progress: bool) -> dict[str, Tensor]:
    """A forward pass block by block keeps each block's inputs (on disk when the model streams
    its weights from disk or when they would take a quarter of the free memory), the loss comes from the last block's outputs through the rest of
    the model, then the backward pass runs block by block in reverse, each block recomputed
    from its kept inputs. The sums of a whole-model backward pass, in the same order; memory
    and devices as in walk_blocks: one block at a time, on `device` or where place_blocks put it."""
    stream = streamed(model)
    prefix, blocks = find_blocks(model)
    devices = block_devices(model, device)
    wanted = set(names)
    sums: dict[str, Tensor] = {}

    with tempfile.TemporaryDirectory(prefix="quantkit-fisher-") as tmp:
        inputs = capture_inputs(model, blocks[0], batches, device)
        kept_bytes = len(blocks) * sum(h.numel() * h.element_size() for h in inputs.hidden)
        offload = Offload(tmp if stream or 4 * kept_bytes > available_memory() else None)
        inputs = BlockInputs(offload.keep(inputs.hidden, device), inputs.args, inputs.kwargs)
        kept = []
        last = len(blocks) - 1
        for i in tqdm(range(last + 1), desc="fisher forward", disable=not progress):   # keeping each block's inputs
            block = bring_block(model, i, devices[i])
            inputs = on_device(inputs, devices[i])
            with torch.no_grad():
                if i == last:                            # what the blocks return, to stand in for them
                    raw = block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
                kept.append(inputs)
                inputs = forward_block(block, inputs, offload)
            put_back(model, i, devices[i])
        grads = []
        with stream.lazily(blocks, device) if stream else nullcontext():  # the last norm and the head
            for j, ids in enumerate(batches):            # the loss from the last block's outputs
                ids = ids.to(device)
                h = inputs.hidden[j].to(device).requires_grad_(True)
                final = _tail(model, blocks, ids, h, raw, device)
                final.backward(_head_loss_grad(model, final, ids))
                grads.append(h.grad)
        for i in tqdm(range(last, -1, -1), desc="fisher backward", disable=not progress):
            block = bring_block(model, i, devices[i])
            handles = []
            for n, m in linears(block).items():
                if f"{prefix}.{i}.{n}" in wanted:
                    def hook(_m, _gin, gout, name=f"{prefix}.{i}.{n}"):
                        sums[name] = sums.get(name, 0) + _squares(gout[0])
                    handles.append(m.register_full_backward_hook(hook))
            try:
                for j in range(len(batches)):
                    x = kept[i].hidden[j].requires_grad_(True)
                    run_block(block, kept[i], j, x).backward(grads[j].to(devices[i]))
                    grads[j] = x.grad
            finally:
                for hd in handles:
                    hd.remove()
            put_back(model, i, devices[i])
    count = sum(ids[:, SINK:].numel() for ids in batches)
    return {n: s.to("cpu") / count for n, s in sums.items()}


class _Replay(nn.Module):
    """Stands in for all the blocks: returns the last block's outputs, kept."""

    def __init__(self, hidden: Tensor, like):
        super().__init__()
        self.hidden, self.like = hidden, like

    def forward(self, *args, **kwargs):
        return self.hidden if isinstance(self.like, Tensor) else (self.hidden, *self.like[1:])


def _tail(model, blocks: nn.ModuleList, ids: Tensor, hidden: Tensor, like, device) -> Tensor:
    """The base model's output when its blocks produce `hidden` (what follows them: the last
    norm; the embeddings, whose output the stand-in ignores, are not read)."""
    saved = dict(blocks._modules)
    blocks._modules = {"0": _Replay(hidden, like)}
    try:
        return model.base_model(inputs_embeds=torch.zeros(*ids.shape, hidden.shape[-1], device=device),
                                use_cache=False)[0]
    finally:
        blocks._modules = saved


Price = Callable[[str, Tensor, Tensor], float]   # (layer, error W - Q, H) -> cost
# A price with `skip` set gets an H over every position but each window's first `skip`.


def hessian_price(name: str, E: Tensor, H: Tensor) -> float:
    return proxy_loss(E, H)


def fisher_price(row_weights: dict[str, Tensor]) -> Price:
    def price(name: str, E: Tensor, H: Tensor) -> float:
        return float((row_weights[name].to(E) * (E @ H * E).sum(1)).sum())
    price.skip = SINK
    return price


def trace_price(traces: dict[str, float]) -> Price:
    # Away from a minimum a layer's trace can come out negative; such a layer is priced at 0.
    def price(name: str, E: Tensor, H: Tensor) -> float:
        return max(traces[name], 0.0) / E.numel() * float((E * E).sum())
    return price


@torch.no_grad()
def unquantized_layers(model: nn.Module, batches: list[Tensor], device: torch.device,
                       progress: bool = True, blocks: set[int] | None = None, skip: int = 0):
    """Yield (qualified name, fp32 weight [out, in], LayerStats, H) of every linear, block by
    block, with statistics of the unquantized model's inputs (only the listed blocks when
    given); H is stats.H, or with `skip` the mean x xᵀ over all but each window's first `skip`
    positions."""
    weights = None
    if skip:
        weights = [torch.ones(b.shape, device=device) for b in batches]
        for w in weights:
            w[:, :skip] = 0
    for i, prefix, block, inputs in walk_blocks(model, batches, device, "sensitivity", progress):
        if blocks is not None and i not in blocks:
            continue
        mods = linears(block)
        groups = input_groups(block, inputs)
        accs = collect_hessians(block, inputs, groups, stop_early=False)
        later = accs if not skip else collect_hessians(block, inputs, groups, stop_early=False,
                                                       token_weights=weights)
        for group in groups:
            stats = accs[group[0]].finalize()
            H = stats.H if not skip else later[group[0]].finalize().H
            for n in group:
                yield f"{prefix}.{n}", weight_matrix(mods[n]).detach().float(), stats, H


@torch.no_grad()
def cost_table(model: nn.Module, batches: list[Tensor], options: list[QSpec], quantizer,
               device: torch.device, price: Price = hessian_price,
               progress: bool = True) -> CostTable:
    """Quantize every linear at every option on the unquantized model's statistics."""
    names, cost, size, weights = [], [], [], []
    stream = streamed(model) is not None
    skip = getattr(price, "skip", 0)
    for name, W, stats, H in unquantized_layers(model, batches, device, progress, skip=skip):
        row_c, row_s = [], []
        for spec in options:
            p = quantizer(W, stats, spec)
            row_c.append(price(name, W - p.dequantize(), H))
            row_s.append(p.storage_bits())
        if stream:                     # one block's scratch at a time, as in the run itself
            del p
            trim_heap()
        names.append(name)
        cost.append(row_c)
        size.append(row_s)
        weights.append(W.numel())
    return CostTable(names, list(options), torch.tensor(cost, dtype=torch.float64),
                     torch.tensor(size, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64))


@torch.no_grad()
def kl_table(model: nn.Module, ids: Tensor, names: list[str], options: list[QSpec], quantizer,
             progress: bool = True) -> CostTable:
    """Mean per-token KL of the output distribution when one layer at a time is quantized."""
    ref = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    cost, size, weights = [], [], []
    for name in tqdm(names, desc="kl sensitivity", disable=not progress):
        mod = model.get_submodule(name)
        W = weight_matrix(mod).detach().float().clone()
        row_c, row_s = [], []
        for spec in options:
            p = quantizer(W, None, spec)
            set_weight_matrix(mod, p.dequantize())
            logq = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
            row_c.append(max(0.0, float((ref.exp() * (ref - logq)).sum(-1).mean())))  # ≥ 0 up to rounding
            row_s.append(p.storage_bits())
        set_weight_matrix(mod, W)
        cost.append(row_c)
        size.append(row_s)
        weights.append(W.numel())
    return CostTable(list(names), list(options), torch.tensor(cost, dtype=torch.float64),
                     torch.tensor(size, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64))


# The sensitivities the recipe's `sensitivity` names: (model, calibration batches, layer names,
# options, the run's compressor, device, progress) -> CostTable. Every layer is quantized at
# every option by the run's own compressor on the unquantized model's statistics, so the table
# prices the errors that compressor will make (GPTQ's fall much faster with bits than RTN's).

@registry.register("sensitivity", "hessian")
def hessian_table(model: nn.Module, batches: list[Tensor], names: list[str], options: list[QSpec],
                  compressor, device: torch.device, progress: bool) -> CostTable:
    """Each layer's own output error tr(E H Eᵀ)."""
    return cost_table(model, batches, options, compressor, device, hessian_price, progress)


@registry.register("sensitivity", "fisher")
def fisher_table(model: nn.Module, batches: list[Tensor], names: list[str], options: list[QSpec],
                 compressor, device: torch.device, progress: bool) -> CostTable:
    """Output errors weighted by the output Fisher (from the first two batches, one window at a
    time, the head on LOSS_CHUNK positions at a time: a 512-token window's fp32 logits over a
    50k vocabulary are 100 MB, and their softmax and gradient as much again each)."""
    small = [b[i:i + 1] for b in batches[:2] for i in range(len(b))]
    price = fisher_price(output_fisher(model, small, names, device, progress))
    return cost_table(model, batches, options, compressor, device, price, progress)


hessian_table.streams = fisher_table.streams = True     # work on a model streamed from disk


@registry.register("sensitivity", "trace")
def trace_table(model: nn.Module, batches: list[Tensor], names: list[str], options: list[QSpec],
                compressor, device: torch.device, progress: bool) -> CostTable:
    """Weight errors priced by the loss Hessian's trace (Hutchinson, one window)."""
    with whole_model_on(model, device):
        price = trace_price(loss_hessian_traces(model, batches[0][:1].to(device), names))
    return cost_table(model, batches, options, compressor, device, price, progress)


@registry.register("sensitivity", "kl")
def kl_sensitivity(model: nn.Module, batches: list[Tensor], names: list[str], options: list[QSpec],
                   compressor, device: torch.device, progress: bool) -> CostTable:
    """Output KL with one layer at a time round-to-nearest quantized (no per-layer statistics)."""
    rtn = registry.get("compressor", "rtn")
    with whole_model_on(model, device):
        return kl_table(model, batches[0][:4].to(device), names, options, rtn, progress)
