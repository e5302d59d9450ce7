"""Seeded random corruption of a checkpoint's safetensors file, its config.json and a recipe
YAML: every case either fails with a QuantkitError (before any output is written) or, where
the corruption changed nothing that matters, loads exactly the original weights. Never a
traceback from inside torch, transformers or safetensors; never a silently different model."""
import json
import random
import shutil
import struct

import pytest
import torch
import yaml

from cli import main
from quantkit.errors import QuantkitError
from quantkit.model.loader import load_model
from tests.conftest import tiny_model
from tests.test_cli import save_tiny_checkpoints

W = "model.safetensors"
N_CASES = 160                     # per fuzzer; the seeds are fixed, so every run sees the same cases
DTYPES = ["F16", "F32", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XX", ""]
VALUES = [0, -1, 1, 7, 10**9, 2.5, "big", None, [1], {"a": 1}, True, ""]
CONFIG_KEYS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
               "vocab_size", "num_key_value_heads", "head_dim", "model_type", "architectures",
               "rms_norm_eps", "tie_word_embeddings", "torch_dtype"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    save_tiny_checkpoints(d, {"llama": tiny_model("llama")})
    return d / "llama"


def corrupt_safetensors(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    kind = rng.choice(["truncate", "length", "flip", "dtype", "offsets", "shape", "drop", "rename",
                       "extra", "data"])
    if kind == "truncate":
        return kind, raw[:rng.randrange(len(raw))]
    if kind == "length":
        return kind, struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40, rng.randrange(2**63)])) + raw[8:]
    if kind in ("flip", "data"):
        b = bytearray(raw)
        i = rng.randrange(8, 8 + n) if kind == "flip" else rng.randrange(8 + n, len(raw))
        b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [max(a - 4, 0), b], [0, 4], [a, a],
                                            [a, 2**40], [-1, b]])
    elif kind == "shape":
        s = entry["shape"]
        numel = 1
        for x in s:
            numel *= x
        entry["shape"] = rng.choice([[numel], [numel // 2, 2] if numel % 2 == 0 else [numel, 1],
                                     s + [1], [], [0], [-1] + s[1:]])
    elif kind == "drop":
        del header[key]
    elif kind == "rename":
        header[key.replace("weight", "wieght")] = header.pop(key)
    else:
        header[key.replace("layers.0", "layers.7") if "layers.0" in key else "model.x.weight"] = dict(entry)
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    return kind, struct.pack("<Q", len(js)) + js + raw[8 + n:]


def corrupt_config(cfg: dict, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "delete", "value", "nonobject"])
    text = json.dumps(cfg, indent=2).encode()
    if kind == "flip":
        b = bytearray(text)
        b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, text[:rng.randrange(len(text))]
    if kind == "nonobject":
        return kind, json.dumps(rng.choice([[], 3, "config", None])).encode()
    c, key = dict(cfg), rng.choice(CONFIG_KEYS)
    if kind == "delete":
        c.pop(key, None)
    else:
        c[key] = rng.choice(VALUES)
    return f"{kind} {key}", json.dumps(c).encode()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("target", ["safetensors", "config"])
def test_corrupted_checkpoints_fail_clearly_or_load_the_same_weights(src, tmp_path, target):
    original, _, _ = load_model(str(src))
    raw, cfg = (src / W).read_bytes(), json.loads((src / "config.json").read_text())
    rng = random.Random(f"checkpoint-{target}")
    outcomes = {"error": 0, "same weights": 0}
    for i in range(N_CASES):
        p = tmp_path / f"case{i}"
        shutil.copytree(src, p)
        if target == "safetensors":
            kind, data = corrupt_safetensors(raw, rng)
            (p / W).write_bytes(data)
        else:
            kind, data = corrupt_config(cfg, rng)
            (p / "config.json").write_bytes(data)
        try:
            model, _, _ = load_model(str(p))
        except QuantkitError:
            outcomes["error"] += 1
        else:
            if kind == "data":           # safetensors has no checksum: a flipped data bit that
                # leaves a finite number cannot be told from a real weight (NaN/Inf is caught)
                assert all(torch.isfinite(t).all() for t in model.state_dict().values())
                outcomes["data bit flip, finite"] = outcomes.get("data bit flip, finite", 0) + 1
            else:
                assert same_weights(model, original), f"case {i} ({kind}) loaded different weights"
                outcomes["same weights"] += 1
        shutil.rmtree(p)
    print(target, outcomes)
    assert outcomes["error"] >= N_CASES // 2           # most corruptions are real ones


def test_corrupted_recipes_fail_clearly_before_writing(src, tmp_path, capsys):
    base = {"model": str(src),
            "calib": {"dataset": str(src.parent / "text.txt"), "n_samples": 4, "seqlen": 32},
            "method": "gptq", "bits": 4, "group_size": 32,
            "eval": {"seqlen": 32}, "llm_int8": {"threshold": 2.0}}
    text = yaml.safe_dump(base, sort_keys=False)                  # model: first
    keep = text.index("\n") + 1                                     # never cut the model line:
    rng = random.Random("recipe")
    fields = ["method", "bits", "group_size", "sym", "act_order", "damp", "alloc", "sensitivity",
              "bit_options", "seed", "fp_target", "prune", "pattern", "device", "calib.n_samples",
              "calib.seqlen", "calib.dataset", "calib.batch_size", "eval.seqlen", "llm_int8.threshold",
              "typo_field", "calib.typo"]
    outcomes = {"error": 0, "ran": 0}
    for i in range(N_CASES // 2):
        kind = rng.choice(["flip", "truncate", "value", "value", "value"])
        if kind == "value":
            d = json.loads(json.dumps(base))
            *path, leaf = rng.choice(fields).split(".")
            node = d
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = rng.choice([v for v in VALUES if v != 10**9] + ["ip", "rtn", "3:4"])
            body = yaml.safe_dump(d, sort_keys=False)
        elif kind == "flip":
            b = bytearray(text.encode())
            b[rng.randrange(keep, len(b))] = rng.randrange(32, 127)
            body = b.decode()
        else:
            body = text[:rng.randrange(keep, len(text))]          # the default model is real
        recipe, out = tmp_path / f"r{i}.yaml", tmp_path / f"out{i}"
        recipe.write_text(body)
        rc = main(["quantize", str(recipe), "--out", str(out)])
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("quantkit: error: ")]
        assert "Traceback" not in err, (i, body, err)
        if rc == 0:
            outcomes["ran"] += 1
            assert (out / W).is_file()
        else:
            assert rc == 2 and len(said) == 1 and not out.exists(), (i, body, err)
            outcomes["error"] += 1
    print(outcomes)
    assert outcomes["error"] >= N_CASES // 8
