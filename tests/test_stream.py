"""Streamed runs (model.stream): weights read block by block from the checkpoint's shards, the
output written shard by shard. The output equals the in-memory run's tensor for tensor; at no
time is more than one block in memory; corrupt weights fail when read, leaving no output."""
import json
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats.io import INDEX, inspect_checkpoint, load_tensors
from quantkit.model import loader
from quantkit.model import stream as stream_mod
from quantkit.model.discovery import find_blocks
from quantkit.model.runner import BLOCK_DEVICES, block_devices, place_blocks
from quantkit.resume import state_dir
from tests.conftest import tiny_config, token_batches
from tests.test_cli import save_tiny_checkpoints

KW = {"group_size": 32, "calib.n_samples": 6, "calib.seqlen": 32, "calib.batch_size": 2}


def sharded(d: Path, name: str, model) -> Path:
    save_tiny_checkpoints(d, {name: model})
    (d / name / "model.safetensors").unlink()
    model.save_pretrained(d / name, max_shard_size="60KB")         # several shards and an index
    assert (d / name / INDEX).is_file() and len(list((d / name).glob("*.safetensors"))) > 2
    return d / name


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 3-block Llama in fp16 with untied head, and a GPT-2 (Conv1D, tied embeddings)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    d = tmp_path_factory.mktemp("stream")
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers, cfg.tie_word_embeddings = 3, False
    sharded(d, "llama", LlamaForCausalLM(cfg).half().eval())
    sharded(d, "gpt2", GPT2LMHeadModel(tiny_config("gpt2")).eval())
    return d


def run(src, name, out, **kw):
    return quantkit.quantize(str(src / name), out=str(out), progress=False,
                             **{**KW, "method": "gptq", "calib.dataset": str(src / "text.txt"), **kw})


@pytest.mark.parametrize("name, extra", [("llama", {}), ("gpt2", {}),
                                         ("llama", {"alloc": "ip", "bits": 3.5, "sensitivity": "fisher"}),
                                         ("llama", {"fp_target": False, "true_sequential": False}),
                                         ("llama", {"method": "rsq", "rsq.residual": False, "alloc": "ip",
                                                    "bits": 3.5, "sensitivity": "fisher"})],
                         ids=["llama", "gpt2", "llama-ip-fisher", "llama-plain", "llama-rsq-blockwise-ip"])
def test_streamed_output_equals_the_in_memory_one(src, tmp_path, name, extra):
    mem = run(src, name, tmp_path / "mem", stream=False, **extra)
    got = run(src, name, tmp_path / "str", stream=True, **extra)
    assert got.model is None and mem.model is not None
    a, b = load_tensors(tmp_path / "mem"), load_tensors(tmp_path / "str")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (tmp_path / "str" / INDEX).is_file() and not (tmp_path / "str" / "model.safetensors").exists()
    assert got.bits_per_weight == mem.bits_per_weight and got.layers.keys() == mem.layers.keys()
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "str"))
    ra, rb = ca.pop("quantization_config"), cb.pop("quantization_config")
    assert ca == cb and ra["layers"] == rb["layers"]
    assert (ra["recipe"]["stream"], rb["recipe"]["stream"]) == (False, True)
    assert inspect_checkpoint(tmp_path / "str")["bits_per_weight"] == \
        inspect_checkpoint(tmp_path / "mem")["bits_per_weight"]
    ids = torch.randint(0, 50, (1, 12))
    assert torch.equal(quantkit.load(tmp_path / "mem")(ids).logits, quantkit.load(tmp_path / "str")(ids).logits)
    assert not state_dir(tmp_path / "str").exists()


def test_one_block_in_memory_at_a_time(src, tmp_path, monkeypatch):
    """Whenever a block is read, every other block and the embeddings are on the meta device;
    the run bounds its heap (big tensors unmapped when freed)."""
    seen, orig = [], stream_mod.Streamed.materialize

    def materialize(self, module, prefix, device):
        _, blocks = find_blocks(self.model)
        seen.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks)
                    + (not self.model.model.embed_tokens.weight.is_meta))
        orig(self, module, prefix, device)
    monkeypatch.setattr(stream_mod.Streamed, "materialize", materialize)
    bounded = []
    monkeypatch.setattr(loader, "bound_heap", lambda: bounded.append(1))
    run(src, "llama", tmp_path / "q", stream=True)
    assert len(seen) >= 3 and max(seen) == 0              # nothing else materialised at any read
    assert bounded == [1]                                  # big tensors unmapped when freed


def test_activations_offloaded_to_disk_give_the_same_output(src, tmp_path):
    run(src, "llama", tmp_path / "mem", stream=False)
    acts = tmp_path / "acts"
    run(src, "llama", tmp_path / "off", stream=True, offload_activations=str(acts))
    a, b = load_tensors(tmp_path / "mem"), load_tensors(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert acts.is_dir() and not list(acts.iterdir())       # each generation deleted once used


def test_auto_streams_when_the_model_would_not_fit(src, tmp_path):
    run(src, "llama", tmp_path / "small", max_memory="1KB")     # everything is over 1 KB: streams
    assert (tmp_path / "small" / INDEX).is_file()
    r = run(src, "llama", tmp_path / "big", max_memory="64GiB")
    assert r.model is not None and (tmp_path / "big" / "model.safetensors").is_file()


@pytest.mark.parametrize("kw, match", [
    ({"method": "rsq"}, "rsq transforms the whole model before calibration, not block by block"),
    ({"alloc": "ip", "bits": 3.5, "sensitivity": "kl"}, "--sensitivity kl runs the whole model"),
    ({"out": None}, "give it --out"),
    ({"max_memory": "lots"}, "give a size such as 8GB"),
])
def test_streaming_refuses_what_needs_the_whole_model(src, tmp_path, kw, match):
    args = {**KW, "calib.dataset": str(src / "text.txt"), "method": "gptq", "stream": True,
            "out": str(tmp_path / "q"), **kw}
    if kw.get("max_memory"):
        args.pop("stream")
    with pytest.raises(QuantkitError, match=match):
        quantkit.quantize(str(src / "llama"), progress=False, **args)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("slab", [None, 7])       # 7: every 16-bit matrix widened a few rows at a time
def test_nan_in_a_later_block_fails_when_read_and_leaves_no_output(src, tmp_path, slab, monkeypatch):
    if slab:
        monkeypatch.setattr(stream_mod, "_SLAB", slab)
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(src / "llama", bad)
    index = json.loads((bad / INDEX).read_text())["weight_map"]
    key = "model.layers.2.mlp.up_proj.weight"
    f = bad / index[key]
    t = load_file(str(f))
    t[key][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match=f"weight {key} holds 1 NaN/Inf"):
        quantkit.quantize(str(bad), out=str(tmp_path / "q"), method="gptq", progress=False, stream=True,
                          **{**KW, "calib.dataset": str(src / "text.txt")})
    assert not (tmp_path / "q").exists()


def test_slab_reads_equal_whole_reads(src, tmp_path, monkeypatch):
    """16-bit matrices above _SLAB elements are widened to fp32 a slab of rows at a time (the
    whole file-dtype copy never sits beside the fp32 one): the same output as whole reads."""
    run(src, "llama", tmp_path / "whole", stream=True)
    whole = load_tensors(tmp_path / "whole")
    widened = []
    orig = stream_mod.Streamed._widened
    monkeypatch.setattr(stream_mod, "_SLAB", 7)
    monkeypatch.setattr(stream_mod.Streamed, "_widened",
                        lambda self, sl: widened.append(orig(self, sl)) or widened[-1])
    run(src, "llama", tmp_path / "slabs", stream=True)
    slabs = load_tensors(tmp_path / "slabs")
    assert whole.keys() == slabs.keys() and all(torch.equal(whole[k], slabs[k]) for k in whole)
    assert sum(t is not None and t.dim() == 2 for t in widened) >= 3 * 7 + 2   # blocks, embeddings, head
    assert all(t is None or t.dtype == torch.float32 for t in widened)


def test_a_streamed_report_cannot_be_saved_again(src, tmp_path):
    r = run(src, "llama", tmp_path / "q", stream=True)
    with pytest.raises(QuantkitError, match="streamed run wrote its output as it went"):
        r.save(tmp_path / "again")


HEAP_PROBE = r"""
import sys, torch
from quantkit.model.stream import bound_heap
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) << 10
if sys.argv[1] == '1':
    bound_heap()
keep, big = [], []
base = rss()
for i in range(64):                      # 2 MiB blocks, each followed by a small survivor
    big.append(torch.ones(1 << 19))
    keep.append(torch.ones(64 << 10))
    if i == 0:
        del big[0]                       # one freed mapping: glibc's threshold rises past 2 MiB
big.clear()
print(rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_bounded_heap_gives_freed_blocks_back_despite_survivors_above_them():
    """A streamed run's big tensors come and go between small ones that stay: with glibc's
    default they stay resident once freed (the heap cannot shrink past a survivor); with
    bound_heap (set by stream_model) resident memory is what is alive."""
    import subprocess
    import sys
    grown = [int(subprocess.run([sys.executable, "-c", HEAP_PROBE, flag], capture_output=True,
                                text=True, check=True).stdout) for flag in "01"]
    alive = 64 * (64 << 10) * 4                               # the survivors: 16 MiB
    assert grown[1] < alive + (8 << 20) < 64 << 20 < grown[0]


def test_place_blocks_spreads_the_blocks_over_the_gpus_by_accelerates_map():
    """Several GPUs: accelerate's device map places whole blocks, in order, each GPU taking a
    share in proportion to its memory; the placement is recorded on the model."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 12
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    even = [d.index for d in place_blocks(model, {0: 40 * 2**30, 1: 40 * 2**30})]
    assert even == sorted(even) and set(even) == {0, 1} and abs(even.count(0) - even.count(1)) <= 2
    assert getattr(model, BLOCK_DEVICES) == [torch.device("cuda", i) for i in even]
    assert block_devices(model, torch.device("cpu")) == getattr(model, BLOCK_DEVICES)
    skew = [d.index for d in place_blocks(model, {0: 60 * 2**30, 1: 20 * 2**30})]
    assert skew == sorted(skew) and skew.count(0) >= 8 and skew.count(1) >= 2
    with pytest.raises(QuantkitError, match="no GPU memory"):
        place_blocks(model, {})


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def test_each_block_runs_where_it_is_placed_with_its_inputs(src, tmp_path):
    """A placed model: walk_blocks reads block i onto its own device and brings its inputs
    (hidden states, masks, position embeddings; offloaded ones read back there) along; the
    meta device stands in for a second GPU. Unplaced, every block runs on the run's device."""
    from quantkit.model.runner import Offload, walk_blocks
    model, _, _ = loader.stream_model(str(src / "llama"))
    assert block_devices(model, torch.device("cpu")) == [torch.device("cpu")] * 3
    cpu, meta = torch.device("cpu"), torch.device("meta")
    setattr(model, BLOCK_DEVICES, [cpu, cpu, meta])
    for offload in (None, Offload(tmp_path / "acts")):
        seen = []
        for _, _, block, inputs in walk_blocks(model, token_batches(4, 16, 2), cpu, "t", False,
                                               offload=offload):
            args = _tensors(inputs.args) + _tensors(inputs.kwargs)
            seen.append(({p.device.type for p in block.parameters()},
                         {h.device.type for h in inputs.hidden}, {t.device.type for t in args}))
        assert seen == [({"cpu"}, {"cpu"}, {"cpu"})] * 2 + [({"meta"}, {"meta"}, {"meta"})]


def test_on_device_moves_only_what_is_elsewhere(tmp_path):
    from quantkit.model.runner import BlockInputs, OnDisk, on_device
    pos = (torch.ones(2, 3), torch.zeros(2, 3))
    here = BlockInputs([torch.ones(2, 3, 4)], [()], [{"position_embeddings": pos, "flag": True}])
    assert on_device(here, torch.device("cpu")) is here and on_device(None, torch.device("cpu")) is None
    there = on_device(here, torch.device("meta"))
    assert there.hidden[0].is_meta and all(t.is_meta for t in there.kwargs[0]["position_embeddings"])
    assert there.kwargs[0]["flag"] is True and here.hidden[0].device.type == "cpu"
    disk = BlockInputs(OnDisk([tmp_path / "h0.pt"], torch.device("cpu")), [()], [{}])
    moved = on_device(disk, torch.device("meta"))
    assert isinstance(moved.hidden, OnDisk) and moved.hidden.paths == disk.hidden.paths
    assert moved.hidden.device == torch.device("meta") and on_device(disk, torch.device("cpu")) is disk
