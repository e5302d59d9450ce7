"""Resumable runs: the state of an unfinished run, beside its output, as `.NAME.resume/`.

After each block the run writes that block's packed layers (block-NNNN.pt) and the calibration
activations the next block will read (acts.pt: the quantized stream and, with fp_target, the
unquantized one), each atomically (a temp file renamed). A fingerprint (fingerprint.json) of
the model files, the calibration tokens, the recipe and the versions is written first; `--resume`
continues only when it matches, after the last block whose files are whole, so that finished
blocks are never recomputed and the result equals an uninterrupted run's. The directory is
removed once the output is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.formats.io import write_shard
from quantkit.formats.packed import PackedLinear
from quantkit.version import __version__

FINGERPRINT = "fingerprint.json"
# recipe fields that change where and how a run works, never its result: a resumed run may differ
NEUTRAL = ("out", "stream", "max_memory", "offload_activations")


def state_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def fingerprint(source: str, model: nn.Module, batches: list[Tensor] | None, recipe: dict) -> dict:
    """What a resumed run must share with the interrupted one. Model files by name, size and
    modification time (config.json by content); a model given in memory by its tensors' sums."""
    import transformers
    d = Path(source)
    if d.is_dir():
        files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.iterdir())
                 if f.is_file() and f.name != "config.json"}
        files["config.json"] = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    else:
        files = {n: [list(p.shape), float(p.double().sum()), float(p.double().abs().sum())]
                 for n, p in model.state_dict().items()}
    calib = hashlib.sha256()
    for b in batches or []:
        calib.update(b.cpu().numpy().tobytes())
    return {"model": {"source": source, "files": files}, "calibration": calib.hexdigest(),
            "recipe": {k: v for k, v in recipe.items() if k not in NEUTRAL},
            "versions": {"quantkit": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def _save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunState:
    """The resumable state of one run (see the module docstring)."""

    def __init__(self, out: str | Path, fp: dict, resume: bool):
        self.dir = state_dir(out)
        self.start = 0                     # blocks already done (restored by resume)
        if resume:
            self._check(fp)
            self.start = self._done()
        else:
            if any(self.dir.glob("block-*.pt")):
                raise QuantkitError(f"{self.dir} holds an interrupted run of {out}: pass --resume "
                                    "to continue it, or delete that directory to start over")
            shutil.rmtree(self.dir, ignore_errors=True)     # a run that ended before any block
            self.dir.mkdir(parents=True)
            (self.dir / FINGERPRINT).write_text(json.dumps(fp, indent=1))

    def _check(self, fp: dict) -> None:
        path = self.dir / FINGERPRINT
        if not path.is_file():
            raise QuantkitError(f"--resume: no interrupted run to continue ({self.dir} does not "
                                "exist or has no fingerprint); run without --resume")
        old = json.loads(path.read_text())
        changed = [k for k in fp if json.dumps(fp[k], sort_keys=True) != json.dumps(old.get(k), sort_keys=True)]
        if changed:
            detail = _first_difference(old.get(changed[0]), fp[changed[0]], changed[0])
            raise QuantkitError(f"--resume: the {', '.join(changed)} changed since the interrupted "
                                f"run ({detail}); rerun with what it used, or delete {self.dir} "
                                "to start over")

    def _done(self) -> int:
        """Blocks done: consecutive block files, up to the block the saved activations follow
        (a streamed run writes each block's weight shard before its block file)."""
        acts = self.dir / "acts.pt"
        if not acts.is_file():
            return 0
        after = torch.load(acts, weights_only=False, mmap=True)["after"]   # tensors not read
        n = 0
        while n <= after and (self.dir / f"block-{n:04d}.pt").is_file():
            n += 1
        return n if n == after + 1 else 0

    def plan(self, make):
        """The run's plan (and cost table), made once by `make()` and kept for resumption."""
        path = self.dir / "plan.pt"
        if path.is_file():
            return torch.load(path, weights_only=False)
        plan = make()
        _save(plan, path)
        return plan

    def restore(self) -> tuple[dict[str, PackedLinear], dict, list[Tensor], list[Tensor] | None]:
        """The packed layers and info of the finished blocks, and the activations after them."""
        packed, info = {}, {}
        for i in range(self.start):
            blk = torch.load(self.dir / f"block-{i:04d}.pt", weights_only=False)
            packed.update({n: PackedLinear(*v) for n, v in blk["packed"].items()})
            info.update(blk["info"])
        acts = torch.load(self.dir / "acts.pt", weights_only=False)
        return packed, info, acts["hidden"], acts["hidden_fp"]

    def block_done(self, i: int, packed: dict[str, PackedLinear], info: dict,
                   hidden: list[Tensor] | None, hidden_fp: list[Tensor] | None,
                   shard: tuple[int, dict[str, Tensor]] | None = None) -> None:
        """Record block i: its packed layers (in a streamed run, whose tensors are in the
        `shard` = (n shards, tensors) written here first, only their shapes) and the
        activations after it."""
        if shard is not None:
            write_shard(self.dir, i, shard[0], shard[1])
        _save({"packed": {n: (p.format, p.shape, p.tensors, p.meta) for n, p in packed.items()},
               "info": info}, self.dir / f"block-{i:04d}.pt")
        _save({"after": i, "hidden": hidden, "hidden_fp": hidden_fp}, self.dir / "acts.pt")

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _first_difference(old, new, where: str) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True):
                return _first_difference(old.get(k), new.get(k), f"{where}.{k}")
    return f"{where}: {json.dumps(old)[:80]} -> {json.dumps(new)[:80]}"
