"""The sequential block runner: capture block 0's inputs once, then feed blocks one by one."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tqdm.auto import tqdm

from quantkit.errors import QuantkitError
from quantkit.model.discovery import find_blocks, linears
from quantkit.model.stream import streamed, trim_heap


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states and the other arguments the block needs."""
    hidden: list[Tensor] | "OnDisk"
    args: list[tuple] = field(default_factory=list)     # positional args after the hidden state
    kwargs: list[dict] = field(default_factory=list)     # masks, position ids / embeddings, ...


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def on_device(inputs: "BlockInputs | None", device: torch.device) -> "BlockInputs | None":
    """The block inputs on `device` (the same object when they are there already; offloaded
    hidden states are then read back onto it)."""
    if inputs is None:
        return None
    hidden = inputs.hidden
    if isinstance(hidden, OnDisk):
        if hidden.device == device:
            return inputs
        hidden = OnDisk(hidden.paths, device)
    elif all(h.device == device for h in hidden):
        return inputs
    else:
        hidden = [h.to(device) for h in hidden]
    return BlockInputs(hidden, _to(inputs.args, device), _to(inputs.kwargs, device))


BLOCK_DEVICES = "_quantkit_block_devices"


def place_blocks(model: nn.Module, max_memory: dict[int, int] | None = None) -> list[torch.device]:
    """Spread the blocks over the GPUs by accelerate's device map (a block is never split),
    each GPU taking a share in proportion to its free memory, and record the placement on the
    model: walk_blocks runs block i on its device, its inputs following it. The blocks still
    run one at a time (the runner's memory bound holds whatever the model's size), so the map
    is asked to spread the whole model, not to fit it: a block the map leaves off the GPUs runs
    on the last one. max_memory: bytes per GPU index (default: each visible GPU's free memory).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    prefix, blocks = find_blocks(model)
    if max_memory is None:
        max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    if not max_memory or min(max_memory.values()) <= 0:
        raise QuantkitError(f"place_blocks: no GPU memory to place blocks on ({max_memory})")
    total, free = compute_module_sizes(model)[""], sum(max_memory.values())
    share = {i: int(m / free * total * 1.05) + 1 for i, m in sorted(max_memory.items())}
    dmap = infer_auto_device_map(model, max_memory=share,
                                 no_split_module_classes=[type(blocks[0]).__name__])
    last = max(max_memory)

    def where(name: str) -> int:
        parts = name.split(".")
        for k in range(len(parts), -1, -1):          # the map's entry for the block or a parent
            got = dmap.get(".".join(parts[:k]))
            if got is not None:
                return got if isinstance(got, int) else last
        return last
    devices = [torch.device("cuda", where(f"{prefix}.{i}")) for i in range(len(blocks))]
    setattr(model, BLOCK_DEVICES, devices)
    return devices


def block_devices(model: nn.Module, device: torch.device) -> list[torch.device]:
    """The device each block runs on: place_blocks' placement, or `device` for all."""
    placed = getattr(model, BLOCK_DEVICES, None)
    return list(placed) if placed is not None else [device] * len(find_blocks(model)[1])


def bring_block(model: nn.Module, i: int, device: torch.device) -> nn.Module:
    """Block i onto `device`: read from the checkpoint when the model streams its weights."""
    prefix, blocks = find_blocks(model)
    stream = streamed(model)
    if stream:
        stream.materialize(blocks[i], f"{prefix}.{i}", device)
    else:
        blocks[i].to(device)
    return blocks[i]


def put_back(model: nn.Module, i: int, device: torch.device) -> None:
    """Block i, done with on `device`: released (its memory back to the OS) when the model
    streams its weights, else back on the CPU."""
    block = find_blocks(model)[1][i]
    stream = streamed(model)
    if stream:
        stream.release(block)
        trim_heap()
    elif device.type != "cpu":
        block.to("cpu")


@contextmanager
def whole_model_on(model: nn.Module, device: torch.device):
    """Every block on `device` for passes through the whole model at once (sensitivities that
    do not go block by block), back on the CPU after; the rest of the model is on the device
    already (the run placed it there)."""
    _, blocks = find_blocks(model)
    if device.type == "cpu":
        yield
        return
    blocks.to(device)
    try:
        yield
    finally:
        blocks.to("cpu")


class OnDisk:
    """Hidden states kept as one file per calibration batch (activation offload): read back
    one at a time, onto `device`, when a block asks for batch i."""

    def __init__(self, paths: list[Path], device: torch.device):
        self.paths, self.device = paths, device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return torch.load(self.paths[i], weights_only=True).to(self.device)
        except FileNotFoundError as e:
            raise QuantkitError(f"offloaded activations {self.paths[i]} are gone; the run cannot "
                                "continue: delete its resume state and start over") from e

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def remove(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


class Offload:
    """Where block outputs go between blocks: memory (directory None) or files in `directory`,
    one generation per block, the older one deleted once the next is written and recorded."""

    def __init__(self, directory: str | Path | None):
        self.dir = None if directory is None else Path(directory)
        self.count = 0

    def keep(self, tensors, device: torch.device):
        if self.dir is None:
            return list(tensors)
        self.count += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for j, t in enumerate(tensors):
            path = self.dir / f"acts-{os.getpid()}-{self.count:05d}-{j:04d}.pt"
            torch.save(t.detach().cpu(), path)
            paths.append(path)
        return OnDisk(paths, device)


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list[Tensor],
                   device: torch.device) -> BlockInputs:
    """Run the model up to the first block for each batch and keep what the block receives."""
    got = BlockInputs(hidden=[])

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        # no KV caches: each block is re-run from scratch
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        got.hidden.append(hidden.detach())
        got.args.append(rest)
        got.kwargs.append(kwargs)
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    stream = streamed(model)
    try:
        with stream.lazily(first_block, device) if stream else nullcontext():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def run_block(block: nn.Module, inputs: BlockInputs, i: int, hidden: Tensor | None = None) -> Tensor:
    out = block(inputs.hidden[i] if hidden is None else hidden, *inputs.args[i], **inputs.kwargs[i])
    return out[0] if isinstance(out, (tuple, list)) else out


def walk_blocks(model: nn.Module, batches: list[Tensor] | None, device: torch.device,
                desc: str, progress: bool = True, start: int = 0,
                hidden: list[Tensor] | OnDisk | None = None, after=None, offload: Offload | None = None):
    """Yield (i, qualified name, block on device, its inputs or None without data); a model
    placed over several GPUs (place_blocks) has each block on its own device, inputs with it.

    After the consumer is done with a block, its (possibly changed) outputs become the next
    block's inputs (`after(i, those inputs)` is then called; None after the last block), and
    the block goes back to the CPU, or, when the model streams its weights from disk
    (model.stream), is released. start, hidden: begin at block `start`, whose input hidden
    states are `hidden` (a resumed run; the other block arguments are captured afresh).
    offload: where the hidden states between blocks are kept (default: memory).
    """
    prefix, blocks = find_blocks(model)
    offload = offload or Offload(None)
    inputs = capture_inputs(model, blocks[0], batches, device) if batches is not None else None
    if inputs is not None:
        if start and start < len(blocks):              # moved to the block's device below
            inputs = BlockInputs(hidden=hidden, args=inputs.args, kwargs=inputs.kwargs)
        elif offload.dir is not None:
            inputs = BlockInputs(offload.keep(inputs.hidden, device), inputs.args, inputs.kwargs)
    devices = block_devices(model, device)
    bar = tqdm(total=len(blocks), initial=start, desc=desc, disable=not progress)
    for i in range(start, len(blocks)):
        block, here = bring_block(model, i, devices[i]), devices[i]
        inputs = on_device(inputs, here)
        yield i, f"{prefix}.{i}", block, inputs
        before = inputs
        if inputs is not None and i + 1 < len(blocks):
            inputs = forward_block(block, inputs, offload)
        if after is not None:
            after(i, inputs if i + 1 < len(blocks) else None)
        if isinstance(before.hidden if before is not None else None, OnDisk) and before is not inputs:
            before.hidden.remove()
        put_back(model, i, here)
        bar.update()
    bar.close()
    if inputs is not None and isinstance(inputs.hidden, OnDisk):     # the last block's inputs
        inputs.hidden.remove()


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, offload: Offload | None = None) -> BlockInputs:
    """The block's outputs for every batch, packaged as the next block's inputs."""
    device = inputs.hidden.device if isinstance(inputs.hidden, OnDisk) else None
    hidden = (run_block(block, inputs, i) for i in range(len(inputs.hidden)))
    if offload is not None and offload.dir is not None:
        hidden = offload.keep(hidden, device or next(block.parameters()).device)
    else:
        hidden = list(hidden)
    return BlockInputs(hidden=hidden, args=inputs.args, kwargs=inputs.kwargs)


@torch.no_grad()
def input_groups(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """Linears of the block grouped by shared input tensor (q/k/v, gate/up), in call order."""
    order: dict[str, int] = {}
    alive: list[Tensor] = []  # keep inputs referenced so that id() values stay unique
    handles = []
    for name, m in linears(block).items():
        def hook(_m, args, name=name):
            alive.append(args[0])
            order.setdefault(name, id(args[0]))
        handles.append(m.register_forward_pre_hook(hook))
    try:
        run_block(block, inputs, 0)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key in order.items():
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def hook_leads(block: nn.Module, groups: list[list[str]], fn, stop_early: bool) -> list:
    """Call fn(lead_name, input) before each group's first linear; optionally stop after the last."""
    mods = linears(block)
    handles = [mods[g[0]].register_forward_pre_hook(lambda _m, args, n=g[0]: fn(n, args[0]))
               for g in groups]
    if stop_early:
        def stop(_m, _args):
            raise _Stop
        handles.append(mods[groups[-1][0]].register_forward_pre_hook(stop))
    return handles


@torch.no_grad()
def submodule_inputs(block: nn.Module, inputs: BlockInputs, i: int, sub: nn.Module) -> tuple[tuple, dict]:
    """(args, kwargs) that `sub` receives when the block runs on batch i; the rest is skipped."""
    got: dict = {}

    def grab(_m, args, kwargs):
        got["call"] = (args, dict(kwargs))
        raise _Stop

    handle = sub.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_until_stop(block, inputs, i)
    finally:
        handle.remove()
    if "call" not in got:
        raise RuntimeError(f"{type(sub).__name__} was not called by {type(block).__name__}")
    return got["call"]


def run_until_stop(block: nn.Module, inputs: BlockInputs, i: int) -> None:
    try:
        run_block(block, inputs, i)
    except _Stop:
        pass
