"""run(recipe): load -> calibrate -> plan (allocation) -> compress block by block -> save.

The pipeline names no method, allocator or sensitivity: each registers itself (quantkit.registry)
with the hooks it needs (options bound from the recipe, early checks, model preparation before
calibration, token weights), and the pipeline calls those.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import pkgutil
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quantkit.alloc
import quantkit.image_run  # noqa: F401  (registers the image-model runner)
import quantkit.prune
import quantkit.quant
import quantkit.stats
from quantkit import registry
from quantkit.alloc.table import CostTable, check_budget, tie
from quantkit.calib.text import calibration_batches, user_calibration
from quantkit.errors import QuantkitError
from quantkit.formats.io import check_output, save_checkpoint, state_dict_for_save, weight_files, write_shard
from quantkit.formats.packed import PackedLinear
from quantkit.model.discovery import find_blocks, fused_groups, linears, set_weight_matrix, weight_matrix
from quantkit.model.loader import check_finite, layer_shapes, load_model, resolve_source, stream_model
from quantkit.model.stream import available_memory, checkpoint_bytes, streamed, trim_heap
from quantkit.model.runner import (BLOCK_DEVICES, BlockInputs, Offload, OnDisk, block_devices, forward_block,
                                   input_groups, on_device, place_blocks, walk_blocks)
from quantkit.resume import RunState, fingerprint, state_dir
from quantkit.quant.base import LayerStats, QSpec, fp_target_weight, proxy_loss, storage_floor
from quantkit.recipe import Recipe
from quantkit.report import write_report
from quantkit.stats import collect_hessians
from quantkit.stats.importance import TokenWeights
from quantkit.version import __version__

for _pkg in (quantkit.alloc, quantkit.prune, quantkit.quant, quantkit.stats):   # every method registers itself
    for _mod in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg.__name__}.{_mod.name}")


@dataclass
class Report:
    """What a run gives back: the summary (also written as run.json next to the checkpoint) and
    the fake-quantized model in memory with its packed layers, ready to evaluate or save."""
    method: str
    out: str | None
    seconds: float
    bits_per_weight: float          # (packed bits + scales/zeros/g_idx) / weights, quantized linears
    size_bytes: int                 # checkpoint file size (0 until saved)
    original_size_bytes: int        # fp32 parameters of the original model
    n_layers: int
    layers: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    packed: dict[str, PackedLinear] = field(default_factory=dict, repr=False)
    table: CostTable | None = field(default=None, repr=False)     # the mixed-precision cost table
    recipe: Recipe | None = field(default=None, repr=False)
    source: str = ""

    SUMMARY = ("method", "out", "seconds", "bits_per_weight", "size_bytes", "original_size_bytes",
               "n_layers", "layers")

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.SUMMARY}

    def save(self, out: str | Path, overwrite: bool = False,
             shards: tuple[Path, int] | None = None) -> "Report":
        """Write the packed checkpoint to `out` (atomically: all of it or nothing; an existing
        `out` is replaced only with overwrite=True). shards: a streamed run's weight shards,
        already written (formats.io.save_checkpoint)."""
        if self.model is None or self.recipe is None:
            raise QuantkitError("this report holds no model to save" + (
                f" (a streamed run wrote its output as it went: {self.out})" if self.out else ""))
        self.out = str(out)
        recipe = self.recipe.with_overrides(out=self.out)

        def files(size: int) -> dict[str, str]:
            self.size_bytes = size
            return {"recipe.yaml": recipe.to_yaml(),
                    "run.json": json.dumps(_provenance(recipe, self), indent=2)}
        save_checkpoint(out, self.model, self.packed, self.tokenizer,
                        {"recipe": recipe.to_dict(), "source": self.source}, files, overwrite, shards)
        return self


@dataclass
class Loaded:
    """The model ready for calibration: seeded, prepared (e.g. rotated), placed."""
    model: nn.Module
    tokenizer: Any
    source: str                       # where the model came from (path, hub id, or a description)
    batches: list[torch.Tensor] | None   # calibration token windows, when the run needs data
    layer_names: list[str]            # every block linear, in block order
    device: torch.device
    stream: bool = False              # weights read from the checkpoint block by block (model.stream)
    offload: Offload | None = None    # where calibration activations live between blocks


def run(recipe: Recipe, progress: bool = True, table: CostTable | None = None,
        model: nn.Module | None = None, tokenizer=None, calib=None, overwrite: bool = False,
        resume: bool = False) -> Report:
    """Quantize recipe.model (or `model`, in place) as the recipe says; save to recipe.out when
    given.

    table: the cost table of this recipe built earlier (sensitivity_table), to compare
    allocators or budgets without rebuilding it. calib: calibration text (a string or a list of
    them, drawn into the recipe's windows) or token ids [n, seqlen] (used as they are) instead
    of the recipe's calibration dataset. overwrite: replace an existing recipe.out (an earlier
    output only); without it an existing out fails before any work. With an out, the run keeps
    its state beside it (quantkit.resume); resume: continue an interrupted run from there.
    """
    for name in registry.names("runner"):      # another model kind (image classifiers) claims it
        runner = registry.get("runner", name)
        if runner.claims(recipe, model):
            if resume:
                raise QuantkitError(f"--resume: {name} runs are not resumable; run without it")
            if recipe.stream or recipe.offload_activations:
                raise QuantkitError(f"--stream / --offload-activations: {name} runs hold the model in "
                                    "memory (image classifiers are small); run without them")
            return runner(recipe, progress, model=model, calib=calib, overwrite=overwrite)
    t0 = time.time()
    _check(recipe, model)
    if recipe.out:
        check_output(recipe.out, overwrite)
    compressor, hooks = method(recipe)
    if hooks.section:                     # the method's options as used, defaults included, on record
        recipe = recipe.with_overrides(**{f"{hooks.section}.{k}": v for k, v in
                                          asdict(recipe.section(hooks.section, hooks.config)).items()})
    m = _load(recipe, hooks, _uses_table(recipe.alloc) or getattr(compressor, "needs_stats", True),
              model, tokenizer, calib)
    if m.stream and not recipe.out:
        raise QuantkitError("a streamed run writes its output block by block: give it --out (out=)")
    state = None
    if recipe.out:
        state = RunState(recipe.out, fingerprint(m.source, m.model, m.batches, recipe.to_dict()), resume)
        plan, table = state.plan(lambda: _plan(recipe, m, compressor, table, progress))
    else:
        if resume:
            raise QuantkitError("--resume needs the run's output directory (--out / out=)")
        plan, table = _plan(recipe, m, compressor, table, progress)
    packed, info = compress_model(m.model, m.batches, plan, compressor, m.device,
                                  recipe.true_sequential, recipe.fp_target, progress,
                                  token_weights=hooks.token_weights(recipe) if hooks.token_weights else None,
                                  state=state, offload=m.offload, n_shards=_n_shards(m.model) if m.stream else None)
    if not m.stream:
        m.model.to("cpu")
    n_weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    bpw = sum(p.storage_bits() for p in packed.values()) / n_weights
    report = Report(method=recipe.method if recipe.prune is None else f"{recipe.prune} {recipe.pattern}"
                    + ("" if recipe.bits == 16 else f" + {recipe.method}"), out=None, seconds=0.0, bits_per_weight=bpw,
                    size_bytes=0, original_size_bytes=_param_bytes(m.model), n_layers=len(packed),
                    layers=info, model=m.model, tokenizer=m.tokenizer, packed=packed, table=table,
                    recipe=recipe, source=m.source)
    if recipe.out:
        report.seconds = time.time() - t0
        report.save(recipe.out, overwrite, _write_outside(m.model, state) if m.stream else None)
        state.finish()
    if m.stream:
        report.model = None       # a skeleton: the weights are in the output, nowhere in memory
    report.seconds = time.time() - t0
    return report


def sensitivity_table(recipe: Recipe, progress: bool = True) -> CostTable:
    """The cost table a mixed-precision run of this recipe would build (to reuse via run(table=))."""
    _check(recipe)
    compressor, hooks = method(recipe)
    return _recipe_table(recipe, _load(recipe, hooks, True), compressor, progress)


# --- checks: everything that needs no calibration, before anything is loaded ---------------

def _check(recipe: Recipe, model: nn.Module | None = None) -> None:
    """Every check that needs no calibration, before anything is loaded (`model`: the
    in-memory model the run was given, whose shapes the budget check reads)."""
    mixed = _uses_table(recipe.alloc)
    if recipe.bn_reestimate:
        raise QuantkitError("--bn-reestimate re-fits the BatchNorm statistics of image models; a "
                            "language model has none")
    if recipe.bias_correction:
        raise QuantkitError("--bias-correction is for image models (each layer's bias absorbs "
                            "the mean output shift of its weight error); language-model runs do "
                            "not apply it")
    if recipe.max_bops is not None:
        raise QuantkitError("--max-bops: a compute budget is for image models (their layers' MACs "
                            "at weight x activation bits); language models are weight-only")
    if recipe.act_bits is not None:
        raise QuantkitError(f"--act-bits: the language-model methods are weight-only ({recipe.method}"
                            " keeps activations in floating point); activation quantization is for "
                            "image models (quantkit quantize resnet --act-bits 8)")
    if recipe.report and not mixed:
        raise QuantkitError("--report describes a bit allocation: use it with --alloc "
                            + " | ".join(_table_allocators()))
    if mixed:
        registry.get("sensitivity", recipe.sensitivity)
    known = registry.sections()
    for name in recipe.sections:
        if name not in known:
            raise QuantkitError(f"recipe: unknown field or section {name!r}; the methods' sections: "
                                f"{', '.join(sorted(known))}")
        recipe.section(name, known[name])
    _, hooks = method(recipe)
    if hooks.check:
        hooks.check(recipe)
    if recipe.prune is not None:
        _prune_spec(recipe)                      # a bad --bits / --group-size fails before loading
    elif mixed:
        _check_budget(recipe, [option_spec(recipe, option) for option in recipe.bit_options], model)
    else:
        base_spec(recipe)


def _check_budget(recipe: Recipe, options: list[QSpec], model: nn.Module | None) -> None:
    """The budget against the option sizes on the layer shapes (from the config: no weights, no
    calibration). Sizes are each compressor's floor (no g_idx, no outlier columns), so a budget
    below their smallest sum can never be met; the cost table checks the exact sizes later."""
    compressor = registry.get("compressor", recipe.method)
    shapes = list(layer_shapes(recipe.model if model is None else model).values())
    n = sum(o * i for o, i in shapes)
    sizes = [[storage_floor(compressor, o, i, s) for s in options] for o, i in shapes]
    check_budget(recipe.bits, sum(map(min, sizes)) / n, sum(map(max, sizes)) / n)


def _uses_table(alloc: str) -> bool:
    """Whether the allocator `alloc` reads a cost table."""
    return getattr(registry.get("allocator", alloc), "needs_table", True)


def _table_allocators() -> list[str]:
    return [n for n in registry.names("allocator") if _uses_table(n)]


# --- load ------------------------------------------------------------------------------------

def _load(recipe: Recipe, hooks: registry.Hooks, need_data: bool, model: nn.Module | None = None,
          tokenizer=None, calib=None) -> Loaded:
    """Load recipe.model (or take `model`), prepare it (the method's hooks), draw the calibration
    windows."""
    seed_everything(recipe.seed)
    device = check_device(recipe.device)
    stream = model is None and _streams(recipe, hooks)
    if model is None:
        model, loaded_tokenizer, source = (stream_model if stream else load_model)(recipe.model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    else:
        find_blocks(model)                                  # unsupported architectures fail here
        check_finite(model)
        model.eval()
        source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    if hooks.prepare and stream:                 # each block as it is read (_why_not_streamed)
        streamed(model).prepare_block = hooks.prepare_block(recipe)
    elif hooks.prepare:
        hooks.prepare(model, recipe)             # before calibration: every statistic sees it
    prefix, blocks = find_blocks(model)
    layer_names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in linears(b)]
    if hasattr(model, BLOCK_DEVICES):            # a model object placed by an earlier run
        delattr(model, BLOCK_DEVICES)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        place_blocks(model)                      # --device cuda, several GPUs: accelerate's map
    batches = None
    if need_data:
        c = recipe.calib
        if calib is None and tokenizer is None:
            raise QuantkitError("calibration needs a tokenizer: pass tokenizer=... with the model, "
                                "or calib=token ids [n, seqlen]")
        if calib is None:
            batches = calibration_batches(tokenizer, c.dataset, c.n_samples, c.seqlen, recipe.seed,
                                          c.batch_size)
        else:
            batches = user_calibration(tokenizer, calib, c.n_samples, c.seqlen, recipe.seed,
                                       c.batch_size)
    if stream:
        trim_heap()                               # what tokenizing the corpora left behind
    else:
        _place_outside_blocks(model, blocks, device)
    return Loaded(model, tokenizer, source, batches, layer_names, device, stream,
                  _offload(recipe, model, stream))


def memory_budget(recipe: Recipe) -> int:
    """recipe.max_memory in bytes ("8GB", "512MiB", a plain number of bytes), or the RAM
    available now."""
    if recipe.max_memory is None:
        return available_memory()
    text = str(recipe.max_memory).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9,
             "MB": 10**6, "KB": 10**3, "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10, "B": 1, "": 1}
    number = text.rstrip("TGMKIB")
    unit = text[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        value = -1
    if value <= 0:
        raise QuantkitError(f"--max-memory {recipe.max_memory!r}: give a size such as 8GB or 512MiB")
    return int(value)


def _streams(recipe: Recipe, hooks: registry.Hooks) -> bool:
    """Whether the run streams its weights (model.stream): recipe.stream, or (None) when the
    model in fp32 would take more than half the memory budget and nothing forbids it."""
    if recipe.stream is False:
        return False
    why = _why_not_streamed(recipe, hooks)
    if recipe.stream:
        if why:
            raise QuantkitError(f"--stream: {why}")
        return True
    if why:
        return False
    return 2 * checkpoint_bytes(resolve_source(recipe.model)) > memory_budget(recipe)


def _why_not_streamed(recipe: Recipe, hooks: registry.Hooks) -> str | None:
    if hooks.prepare and (hooks.prepare_block is None or hooks.prepare_block(recipe) is None):
        return (f"{recipe.method} transforms the whole model before calibration, not block by block, "
                "which needs it in memory; run without --stream")
    if _uses_table(recipe.alloc) and not getattr(registry.get("sensitivity", recipe.sensitivity),
                                                 "streams", False):
        able = [n for n in registry.names("sensitivity") if getattr(registry.get("sensitivity", n), "streams", False)]
        return (f"--sensitivity {recipe.sensitivity} runs the whole model at once; use "
                f"{' or '.join(able)}, or run without --stream")
    if not recipe.out:
        return "a streamed run writes its output block by block: give it --out (out=)"
    source = Path(resolve_source(recipe.model))
    if not source.is_dir() or not any(f.is_file() for f in weight_files(source)):
        return (f"{recipe.model}: streaming reads a local checkpoint with safetensors weights; "
                "download it (or convert pytorch_model.bin to safetensors) first")
    return None


def _offload(recipe: Recipe, model: nn.Module, stream: bool) -> Offload:
    """recipe.offload_activations, or (a streamed run) files beside the output when the
    calibration activations would take more than a quarter of the memory budget."""
    if recipe.offload_activations is not None:
        return Offload(recipe.offload_activations)
    if not stream:
        return Offload(None)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    size = recipe.calib.n_samples * recipe.calib.seqlen * hidden * 4 * (2 if recipe.fp_target else 1)
    return Offload(state_dir(recipe.out) / "acts" if 4 * size > memory_budget(recipe) else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_device(device: str) -> torch.device:
    """The torch device, or a clear error when CUDA is asked for but absent."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise QuantkitError(f"--device {device!r}: {e}") from e


def _place_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Embeddings, norms and heads go to the device; blocks stay put until their turn."""
    if device.type == "cpu":
        return
    keep = {id(p) for p in blocks.parameters()}
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if id(p) not in keep:
                p.data = p.data.to(device)


# --- plan: which QSpec each linear gets ---------------------------------------------------------

def _plan(recipe: Recipe, m: Loaded, compressor, table: CostTable | None,
          progress: bool) -> tuple[dict[str, QSpec | None], CostTable | None]:
    """The QSpec of every linear (None: keep the kept weights of a pruned layer in fp16), and
    the cost table it was allocated from (mixed precision)."""
    if not _uses_table(recipe.alloc):
        spec = _prune_spec(recipe) if recipe.prune is not None else base_spec(recipe)
        return {name: spec for name in m.layer_names}, table
    if table is None:
        table = _recipe_table(recipe, m, compressor, progress)
    choice = allocate(recipe, table)
    if recipe.report:
        write_report(recipe.report, table, choice, recipe.bits, recipe.alloc, recipe.sensitivity)
    return table.as_plan(choice), table


def base_spec(recipe: Recipe, bits: float | None = None) -> QSpec:
    """The recipe's QSpec at `bits` (default: recipe.bits, which must then be a width)."""
    bits = recipe.bits if bits is None else bits
    if bits != int(bits):
        raise QuantkitError(f"--bits {bits}: a fractional budget needs a mixed-precision "
                            f"allocator (--alloc {' | '.join(_table_allocators())})")
    try:
        return QSpec(bits=int(bits), group_size=recipe.group_size, sym=recipe.sym,
                     act_order=recipe.act_order, static_groups=recipe.static_groups,
                     mse=recipe.mse, damp=recipe.damp)
    except ValueError as e:
        raise QuantkitError(str(e)) from e


def option_spec(recipe: Recipe, option: int | str) -> QSpec:
    """A mixed-precision option: a width (the recipe's group size) or "BITS:GROUP"."""
    bits, _, group = str(option).partition(":")
    try:
        spec = base_spec(recipe, int(bits))
        return spec if not group else QSpec(**{**asdict(spec), "group_size": int(group)})
    except (ValueError, QuantkitError) as e:
        raise QuantkitError(f"bit option {option!r}: {e}; use a width (2, 3, 4, 8) or BITS:GROUP "
                            "like 4:64") from e


def _prune_spec(recipe: Recipe) -> QSpec | None:
    """None keeps the kept weights in fp16 (--bits 16, `quantkit prune`); the pruners turn
    act-order off themselves (N:M groups are consecutive input columns)."""
    return None if recipe.bits == 16 else base_spec(recipe)


def _recipe_table(recipe: Recipe, m: Loaded, compressor, progress: bool) -> CostTable:
    """The recipe's sensitivity over its bit options, on the first calib.table_samples windows."""
    options = [option_spec(recipe, b) for b in recipe.bit_options]
    build = registry.get("sensitivity", recipe.sensitivity)
    return build(m.model, first_samples(m.batches, recipe.calib.table_samples), m.layer_names,
                 options, compressor, m.device, progress)


def first_samples(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first n calibration windows, as batches."""
    out, k = [], 0
    for b in batches:
        if k >= n:
            break
        out.append(b[:n - k])
        k += len(out[-1])
    return out


def allocate(recipe: Recipe, table: CostTable):
    """The option index per layer that the recipe's allocator picks for its budget."""
    table.check_feasible(recipe.bits)
    allocator = registry.get("allocator", recipe.alloc)
    if not recipe.tie_fused:
        return allocator(table, recipe.bits)
    tied, rows = tie(table, fused_groups(table.layers))   # q/k/v and gate/up get one width
    return allocator(tied, recipe.bits)[rows]


# --- compress, block by block -----------------------------------------------------------------

def method(recipe: Recipe):
    """(the recipe's compressor or pruner with its recipe options bound, its registry hooks)."""
    kind, name = ("compressor", recipe.method) if recipe.prune is None else ("pruner", recipe.prune)
    fn, hooks = registry.get(kind, name), registry.hooks(kind, name)
    options = hooks.options(recipe) if hooks.options else {}
    if not options:
        return fn, hooks
    bound = functools.partial(fn, **options)
    bound.__dict__.update(fn.__dict__)           # its attributes (needs_stats, storage_floor) stay
    return bound, hooks


def compress_model(model: nn.Module, batches: list[torch.Tensor] | None, plan: dict[str, QSpec],
                   compressor, device: torch.device, true_sequential: bool = True,
                   fp_target: bool = False, progress: bool = True,
                   token_weights: TokenWeights | None = None, state: RunState | None = None,
                   offload: Offload | None = None, n_shards: int | None = None
                   ) -> tuple[dict[str, PackedLinear], dict]:
    """Compress every planned linear, block by block; the model ends up fake-quantized.

    fp_target: aim each layer at the unquantized model's outputs (see fp_target_weight), at
    the cost of running an unquantized copy of each block beside it.
    token_weights: per block, weights of the calibration tokens in its Hessians (a method's
    token_weights hook); computed once on the block's inputs before any of its linears is
    quantized. With fp_target the
    cross term gets the same weights, so the target stays the weighted least-squares one.
    state: record each finished block there, and begin after the blocks it already holds.
    offload: where activations live between blocks (default: memory). n_shards: the model
    streams its weights (model.stream): each finished block's tensors go to its weight shard
    in `state` (of n_shards) at once, and only their shapes stay in the returned layers.
    """
    packed, info, hidden, hidden_fp, start = {}, {}, None, None, 0
    if state is not None and state.start:
        packed, info, hidden, hidden_fp = state.restore()
        start = state.start
        for n, p in packed.items():
            if n_shards is None:
                set_weight_matrix(model.get_submodule(n), p.dequantize())
    inputs_fp = None
    prefix, blocks = find_blocks(model)
    n_blocks = len(blocks)

    def after(i: int, next_inputs) -> None:
        nonlocal inputs_fp, ref
        if ref is not None and i + 1 < n_blocks:
            before, inputs_fp = inputs_fp, forward_block(ref, inputs_fp, offload)
            if isinstance(before.hidden, OnDisk):
                before.hidden.remove()
        ref = None
        if state is None:
            return
        mine = [n for n in packed if n.startswith(f"{prefix}.{i}.")]
        shard = None
        if n_shards is not None:
            rel = {n[len(f"{prefix}.{i}."):]: packed[n] for n in mine}
            shard = (n_shards, {f"{prefix}.{i}.{k}": t
                                for k, t in state_dict_for_save(blocks[i], rel).items()})
            for n in mine:
                packed[n] = shapes_only(packed[n])
        state.block_done(i, {n: packed[n] for n in mine}, {n: info[n] for n in mine},
                         None if next_inputs is None else next_inputs.hidden,
                         None if not fp_target or next_inputs is None else inputs_fp.hidden, shard)
    ref = None
    devices = block_devices(model, device)
    for i, block_name, block, inputs in walk_blocks(model, batches, device, "blocks", progress,
                                                     start, hidden, after, offload):
        ref = copy.deepcopy(block) if fp_target and inputs is not None else None
        if inputs_fp is None and inputs is not None:
            inputs_fp = inputs if hidden_fp is None else BlockInputs(hidden_fp, inputs.args, inputs.kwargs)
        inputs_fp = on_device(inputs_fp, devices[i])        # with its block (place_blocks)
        mods = linears(block)
        full = lambda n: f"{block_name}.{n}"  # noqa: E731
        todo = [n for n in mods if full(n) in plan]
        if inputs is None:
            for n in todo:
                _compress(full(n), mods[n], compressor, None, plan[full(n)], packed, info)
            continue
        groups = [[n for n in g if n in todo] for g in input_groups(block, inputs)]
        groups = [g for g in groups if g]
        stages = [[g] for g in groups] if true_sequential else [groups]
        weights = token_weights(block, inputs) if token_weights is not None and groups else None
        for stage in stages:
            accs = collect_hessians(
                block, inputs, stage, None if ref is None else (ref, inputs_fp),
                token_weights=weights)
            for g in stage:
                stats = accs[g[0]].finalize()
                for n in g:
                    _compress(full(n), mods[n], compressor, stats, plan[full(n)], packed, info)
            if n_shards is not None:          # streamed: the stage's Hessians back to the OS now
                del accs, stats
                trim_heap()
    if inputs_fp is not None and isinstance(inputs_fp.hidden, OnDisk):
        inputs_fp.hidden.remove()
    return packed, info


def shapes_only(p: PackedLinear) -> PackedLinear:
    """The layer's format, shape and metadata, its tensors as meta (sizes kept, no memory)."""
    return PackedLinear(p.format, p.shape, {k: t.to("meta") for k, t in p.tensors.items()}, p.meta)


def _outside(model: nn.Module) -> list[str]:
    """Names of the tensors a checkpoint of `model` saves outside its blocks (tied copies once)."""
    prefix, _ = find_blocks(model)
    seen, names = set(), []
    for n, t in model.state_dict(keep_vars=True).items():
        if not n.startswith(prefix + ".") and id(t) not in seen:
            seen.add(id(t))
            names.append(n)
    return names


def _n_shards(model: nn.Module) -> int:
    """A streamed output's shards: one per block, then one per tensor outside the blocks."""
    return len(find_blocks(model)[1]) + len(_outside(model))


def _write_outside(model: nn.Module, state: RunState) -> tuple[Path, int]:
    """Write the tensors outside the blocks (embeddings, final norm, head) of a streamed model
    into their shards, one at a time; returns (shard directory, number of shards)."""
    stream, n = streamed(model), _n_shards(model)
    first = len(find_blocks(model)[1])
    for j, name in enumerate(_outside(model)):
        mod, _, leaf = name.rpartition(".")
        sub = model.get_submodule(mod)
        if leaf in sub._parameters:
            stream.materialize(sub, mod, torch.device("cpu"))
        write_shard(state.dir, first + j, n, {name: model.get_submodule(mod).state_dict()[leaf].detach()})
        stream.release(sub, recurse=False)
    return state.dir, n


def _compress(name: str, mod: nn.Module, compressor, stats: LayerStats | None, spec: QSpec | None,
              packed: dict, info: dict) -> None:
    t0 = time.time()
    W = weight_matrix(mod).detach().float()
    if stats is not None:
        W = fp_target_weight(W, stats, QSpec().damp if spec is None else spec.damp)
    p = compressor(W, stats, spec)
    seconds = time.time() - t0
    if getattr(mod, "input_hadamard", None):     # run-time transform of the input (a rotation): part of the layer
        p = replace(p, meta={**p.meta, "input_hadamard": mod.input_hadamard})
    Q = p.dequantize()
    entry = {"bits": p.meta.get("bits", 16), "group_size": p.meta.get("group_size", -1),
             "bpw": p.bits_per_weight, "seconds": seconds}
    if stats is not None:
        entry["proxy_loss"] = proxy_loss(W - Q, stats.H)
    set_weight_matrix(mod, Q)
    packed[name] = p
    info[name] = entry


# --- save ---------------------------------------------------------------------------------------

def _param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    return total


def _provenance(recipe: Recipe, report: Report) -> dict:
    import transformers
    return {"recipe": recipe.to_dict(), "seed": recipe.seed,
            "versions": {"quantkit": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "report": {k: v for k, v in report.to_dict().items() if k != "layers"}}
