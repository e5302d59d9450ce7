"""Resumable runs: a run killed with SIGKILL (inside a block, while recording a block, while
writing the output) resumes from its last finished block to output identical to an
uninterrupted run's; the output directory never exists half-written."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.formats.io import load_tensors
from quantkit.resume import state_dir
from tests.conftest import tiny_config
from tests.test_cli import save_tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process: quantize, SIGKILL-ing itself at the named point.
CHILD = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import quantkit, quantkit.pipeline as P, quantkit.resume as R, quantkit.formats.io as io
where, src, out, text, resume, stream = sys.argv[1:7]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "inside-block-1":            # halfway through block 1's linears
    orig, seen = P._compress, []
    def compress(name, *a, **k):
        if name.startswith("model.layers.1."):
            seen.append(name)
            if len(seen) == 4:
                die()
        return orig(name, *a, **k)
    P._compress = compress
elif where == "recording-block-1":       # block 1's packed file is written, its activations half
    orig_save = R._save
    def save(obj, path):
        if path.name == "acts.pt" and obj["after"] == 1:
            open(path.with_name(path.name + ".tmp"), "wb").write(b"half")
            die()
        orig_save(obj, path)
    R._save = save
elif where == "writing-output":          # the weights file half-written in the output's temp dir
    def save_file(tensors, path, metadata=None):
        open(path, "wb").write(b"\0" * 1000)
        die()
    io.save_file = save_file
elif where == "writing-shard-1":         # streamed: block 1's weight shard half-written
    orig_file = io.save_file
    def save_file(tensors, path, metadata=None):
        if "-00002-of-" in path:
            open(path, "wb").write(b"\0" * 1000)
            die()
        orig_file(tensors, path, metadata=metadata)
    io.save_file = save_file
elif where == "linking-shards":          # streamed: two shards already linked into the output
    orig_link, linked = os.link, []
    def link(a, b):
        orig_link(a, b)
        linked.append(b)
        if len(linked) == 2:
            die()
    os.link = link
quantkit.quantize(src, out=out, resume=resume == "1", stream=stream == "1", method="gptq", progress=False,
                  **{{"group_size": 32, "calib.n_samples": 6, "calib.seqlen": 32, "calib.batch_size": 2,
                     "calib.dataset": text}})
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    from transformers import LlamaForCausalLM
    config = tiny_config("llama")
    config.num_hidden_layers = 3                # three blocks: kill points in the middle one
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    save_tiny_checkpoints(d, {"llama": model})
    return d


def child(src, out, where, resume=False, stream=False):
    script = out.parent / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), where, str(src / "llama"), str(out),
                           str(src / "text.txt"), "1" if resume else "0", "1" if stream else "0"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "q"
    r = child(src, out, "none")
    assert r.returncode == 0, r.stderr
    assert not state_dir(out).exists()                      # the state goes once the output is whole
    return load_tensors(out)


@pytest.mark.parametrize("where, blocks_kept, stream", [
    ("inside-block-1", 1, False), ("recording-block-1", 2, False), ("writing-output", 3, False),
    ("inside-block-1", 1, True), ("writing-shard-1", 1, True), ("linking-shards", 3, True)])
def test_a_killed_run_resumes_to_the_same_output(src, reference, tmp_path, where, blocks_kept, stream):
    """Streamed runs (weights read and written shard by shard) too: the same output as the
    in-memory uninterrupted run, whether killed in a block, writing a shard or assembling."""
    out = tmp_path / "q"
    r = child(src, out, where, stream=stream)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()                                 # never there half-written
    state = state_dir(out)
    assert sorted(p.name for p in state.glob("block-*.pt")) == \
        [f"block-{i:04d}.pt" for i in range(blocks_kept)]
    again = child(src, out, "none", stream=stream)          # without --resume: refused
    assert again.returncode != 0 and "pass --resume" in again.stderr
    done = child(src, out, "count", resume=True, stream=stream)
    assert done.returncode == 0, done.stderr
    got = load_tensors(out)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)
    assert not state.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "q"]


def test_finished_blocks_are_not_recomputed(src, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    assert child(src, out, "inside-block-1").returncode == -signal.SIGKILL
    import quantkit.pipeline as P
    orig, done = P._compress, []
    monkeypatch.setattr(P, "_compress", lambda name, *a, **k: (done.append(name), orig(name, *a, **k))[1])
    quantkit.quantize(str(src / "llama"), out=str(out), resume=True, method="gptq", progress=False,
                      **{"group_size": 32, "calib.n_samples": 6, "calib.seqlen": 32,
                         "calib.batch_size": 2, "calib.dataset": str(src / "text.txt")})
    assert done and not any(n.startswith("model.layers.0.") for n in done)
    assert {n.split(".")[2] for n in done} == {"1", "2"}
    got = load_tensors(out)
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_resuming_with_anything_changed_is_refused(src, tmp_path):
    out = tmp_path / "q"
    assert child(src, out, "inside-block-1").returncode == -signal.SIGKILL
    base = {"group_size": 32, "calib.n_samples": 6, "calib.seqlen": 32, "calib.batch_size": 2,
            "calib.dataset": str(src / "text.txt")}
    run = lambda **kw: quantkit.quantize(str(src / "llama"), out=str(out), resume=True,  # noqa: E731
                                         method="gptq", progress=False, **{**base, **kw})
    with pytest.raises(QuantkitError, match=r"the recipe changed .*recipe.bits: 4 -> 3"):
        run(bits=3)
    with pytest.raises(QuantkitError, match=r"the calibration, recipe changed since the interrupted run \(calibration: "):
        run(seed=1)
    cfg = src / "llama" / "config.json"
    text = cfg.read_text()
    try:
        cfg.write_text(json.dumps({**json.loads(text), "rms_norm_eps": 1e-5}))
        with pytest.raises(QuantkitError, match=r"the model changed .*config.json"):
            run()
    finally:
        cfg.write_text(text)
    with pytest.raises(QuantkitError, match="no interrupted run to continue"):
        quantkit.quantize(str(src / "llama"), out=str(tmp_path / "other"), resume=True,
                          method="gptq", progress=False, **base)


def test_same_inputs_and_seed_give_identical_packed_tensors_on_1_and_2_threads(src, tmp_path):
    kw = {"group_size": 32, "calib.n_samples": 6, "calib.seqlen": 32, "calib.batch_size": 2,
          "calib.dataset": str(src / "text.txt")}
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            runs.append(quantkit.quantize(str(src / "llama"), method="gptq", progress=False, **kw).packed)
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for n, p in runs[0].items():
            assert all(torch.equal(t, other[n].tensors[k]) for k, t in p.tensors.items()), n
    out = tmp_path / "q"
    quantkit.quantize(str(src / "llama"), method="gptq", progress=False, out=str(out), seed=5, **kw)
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"]["seed"] == 5 and record["recipe"]["calib"]["n_samples"] == 6
    assert {"torch", "transformers", "quantkit"} <= set(record["versions"])
