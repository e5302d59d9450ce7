"""Streaming: a model whose weights stay in their safetensors files until a block needs them.

`Streamed` is attached to a skeleton model (parameters on the meta device, buffers real) as
`model.quantkit_stream`. The block runner (model.runner) asks it to materialise a block before
use and to release it after; modules outside the blocks (embeddings, final norm, head) are
materialised lazily, when a forward pass first calls them, and released when that pass ends.
Tensors are read from the memory-mapped shards one at a time in the checkpoint's own dtype and
cast to the compute dtype (fp32, as the in-memory path loads them), so a streamed block is
bit-identical to the same block of the whole model loaded at once.
"""
from __future__ import annotations

import math

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.formats.io import weight_files
from quantkit.model.discovery import find_blocks

ATTR = "quantkit_stream"


def available_memory() -> int:
    """The RAM available now (MemAvailable), or no limit where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def streamed(model: nn.Module) -> "Streamed | None":
    """The model's weight stream, when its weights live on disk."""
    return getattr(model, ATTR, None)


def canonical(key: str, expected, prefix: str) -> str | None:
    """The model's name for a checkpoint tensor, also when saved with or without the base
    model's prefix (e.g. 'model.')."""
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def non_finite(named) -> None:
    """Every tensor of (name, tensor) pairs finite, or an error naming the first bad one."""
    bad = [(n, int((~torch.isfinite(t)).sum())) for n, t in named
           if t.is_floating_point() and not _all_finite(t)]
    if bad:
        name, count = bad[0]
        raise QuantkitError(f"weight {name} holds {count} NaN/Inf values ({len(bad)} tensors): "
                            "the checkpoint is corrupt or was saved after a diverged step")


def _all_finite(t: Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() with a scratch of `chunk` booleans, not one per element."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def checkpoint_bytes(directory: str | Path) -> int:
    """The size of a checkpoint's floating-point tensors in fp32 (from the safetensors headers
    alone), 0 when it has no safetensors; a file it cannot read counts 0 (the loader's checks
    then name the problem)."""
    import math

    import safetensors
    total = 0
    for f in weight_files(directory):
        try:
            with safetensors.safe_open(str(f), "pt") as st:
                total += sum(4 * math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        except Exception:                                        # missing, SafetensorError and kin
            continue
    return total


def _glibc(fn: str, *args) -> None:
    """Call one of glibc's malloc tunings; elsewhere (musl, macOS, Windows) nothing happens."""
    import ctypes
    try:
        getattr(ctypes.CDLL("libc.so.6"), fn)(*args)
    except (OSError, AttributeError):
        pass


def bound_heap(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more by a mapping of its own, unmapped
    when freed. glibc's default raises that threshold to the largest block freed so far (up to
    32 MiB) and keeps blocks under it in a heap that fragments as a streamed run's weights,
    Hessians and activations come and go: resident memory then outgrows what is alive. Set
    once, process-wide, when a model is streamed (measured: no slower)."""
    _glibc("mallopt", -3, threshold)                          # M_MMAP_THRESHOLD


def trim_heap(collect: bool = True) -> None:
    """Hand freed heap back to the OS (glibc otherwise keeps it resident): after a block is
    released, after calibration, after a layer's kernel scratch; garbage collected first
    unless `collect` is False (a caller in a loop that makes no reference cycles)."""
    if collect:
        import gc
        gc.collect()
    _glibc("malloc_trim", 0)


_FILE_BYTES = {"F16": 2, "BF16": 2}   # file dtypes widened to fp32 a slab at a time
_SLAB = 1 << 22                      # elements per slab (16 MB in fp32)


class Streamed:
    """Where each tensor of `model` lives in the checkpoint at `directory`, and the means to
    bring a module's tensors in (materialize) and out (release) again."""

    def __init__(self, model: nn.Module, directory: str | Path, dtype=torch.float32):
        import safetensors
        self.dtype = dtype
        self.model = model
        expected = dict(model.state_dict(keep_vars=True))
        prefix = getattr(model, "base_model_prefix", "")
        self.where: dict[str, tuple[Path, str]] = {}
        for f in weight_files(directory):
            with safetensors.safe_open(str(f), "pt") as st:
                for key in st.keys():
                    name = canonical(key, expected, prefix)
                    if name is not None:
                        self.where[name] = (f, key)
        # every name of each parameter (tied weights have several): materialised and released together
        self.aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.aliases.setdefault(id(p), []).append(name)
        self.bytes_read = 0
        # the method's preparation of one block (model, block, index, first read), done to each
        # block as it is read: its weights arrive from the file as they were (registry's prepare_block)
        self.prepare_block = None
        self._prepared: set[int] = set()

    def _read(self, names: list[str]) -> Tensor:
        import safetensors
        for n in names:
            if n in self.where:
                f, key = self.where[n]
                with safetensors.safe_open(str(f), "pt") as st:
                    sl = st.get_slice(key)
                    t = self._widened(sl)
                    if t is not None:
                        self.bytes_read += t.numel() * _FILE_BYTES[sl.get_dtype()]
                        non_finite([(n, t)])    # finite in the file's dtype iff after widening
                        return t
                    t = st.get_tensor(key)
                self.bytes_read += t.numel() * t.element_size()
                if not t.is_floating_point():
                    return t
                wider = torch.finfo(self.dtype).max >= torch.finfo(t.dtype).max
                if wider:                     # finite in the file's dtype iff after the cast
                    non_finite([(n, t)])
                t = t.to(self.dtype)
                if not wider:
                    non_finite([(n, t)])
                return t
        raise QuantkitError(f"{names[0]}: in no weight file of the checkpoint; download it again")

    def _widened(self, sl) -> Tensor | None:
        """A large 16-bit float tensor read into self.dtype a slab of rows at a time, so that
        the file-dtype copy of the whole tensor (a vocabulary matrix: hundreds of MB) never
        sits beside the widened one; None for anything else (read whole)."""
        shape = sl.get_shape()
        if (sl.get_dtype() not in _FILE_BYTES or len(shape) < 2 or self.dtype != torch.float32
                or math.prod(shape) <= _SLAB):
            return None
        out = torch.empty(shape, dtype=self.dtype)
        step = max(1, _SLAB // math.prod(shape[1:]))
        for a in range(0, shape[0], step):
            out[a:a + step] = sl[a:a + step]
        return out

    def _put(self, names: list[str], value: Tensor | None) -> None:
        """One Parameter (value, or an empty meta tensor) under every name of a tied set."""
        old = self.model.get_parameter(names[0])
        t = value if value is not None else torch.empty(old.shape, dtype=old.dtype, device="meta")
        p = nn.Parameter(t, requires_grad=False)
        for n in names:
            mod, _, leaf = n.rpartition(".")
            self.model.get_submodule(mod)._parameters[leaf] = p
        self.aliases[id(p)] = names

    def _bring(self, name: str, device: torch.device) -> None:
        p = self.model.get_parameter(name)
        if p.is_meta:
            names = self.aliases.pop(id(p))
            self._put(names, self._read(names).to(device))

    def _drop(self, p: nn.Parameter) -> None:
        if not p.is_meta and id(p) in self.aliases:
            self._put(self.aliases.pop(id(p)), None)

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """Read every meta parameter of `module` (named `prefix` in the model) onto `device`;
        a block read from the file is then prepared (prepare_block)."""
        brought = False
        for name, p in list(module.named_parameters(prefix=prefix)):
            brought |= p.is_meta
            self._bring(name, device)
        if brought and self.prepare_block is not None:
            _, blocks = find_blocks(self.model)
            index = next((i for i, b in enumerate(blocks) if b is module), None)
            if index is not None:
                self.prepare_block(self.model, module, index, index not in self._prepared)
                self._prepared.add(index)
            elif any(module is m for b in blocks for m in b.modules()):
                raise QuantkitError(f"{prefix}: a part of a block read alone, which the method's "
                                    "per-block preparation cannot transform; read the whole block")

    def release(self, module: nn.Module, recurse: bool = True) -> None:
        """Back to the meta device: the module's memory is freed."""
        for p in list(module.parameters(recurse=recurse)):
            self._drop(p)

    @contextmanager
    def lazily(self, skip: nn.Module, device: torch.device):
        """Within the block: every module outside `skip` that a forward pass calls has its
        parameters read just before; all of them are released at the end."""
        inside = {id(m) for m in skip.modules()}
        touched: list[nn.Module] = []

        def bring(mod, _args, name):
            for n, _ in list(mod.named_parameters(prefix=name, recurse=False)):
                self._bring(n, device)
            touched.append(mod)

        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: bring(mod, args, name))
                   for name, m in self.model.named_modules()
                   if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for mod in touched:
                self.release(mod, recurse=False)
