"""Models larger than memory: build a synthetic Llama-architecture checkpoint of several GB on
disk (fp16, sharded, random weights at the usual initialisation scale) and quantize it with a
streamed run (`--stream`), sampling the process's resident memory as it goes. The default
shape (hidden 1536, intermediate 4096, 12/4 heads: Qwen2-1.5B's width, a shorter MLP) is deep
rather than wide: a streamed run holds one block, the process's libraries (~0.45 GB) and the
calibration activations, so the checkpoint's depth sets its size, its width the peak.

    python bench/scale.py                      # 120 blocks of 1536 wide: 6.3 GB; GPTQ 4-bit
    python bench/scale.py --alloc uniform ip   # and a mixed-precision job: ip over GPTQ at 3:128,4:128,8

Each run is `cli.py quantize llama --model CKPT --bits 4 --stream ...` in a child process; its
peak RSS (getrusage of the child, exact), RSS over time (sampled every 0.5 s), wall time and
the run summary go to bench/results/scale.json (rows keyed by alloc).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import default_path, save_rows  # noqa: E402
from quantkit.formats.io import write_shard  # noqa: E402
from quantkit.model.loader import resolve_source  # noqa: E402
from quantkit.model.zoo import cache_dir  # noqa: E402

TOKENIZER_FROM = "smollm2-135m"          # a real tokenizer, so the calibration text is real text


def llama_config(a, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
            "intermediate_size": a.inter, "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "float16",
            "bos_token_id": 1, "eos_token_id": 2}


def block_tensors(i: int, a, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Block i at the usual initialisation: N(0, 0.02), the residual writers (o, down) scaled
    by 1/sqrt(2 L) as GPT-2 does; norms at one."""
    h, f, kv = a.hidden, a.inter, a.hidden // a.heads * a.kv_heads
    out = 0.02 / math.sqrt(2 * a.layers)
    shapes = {"self_attn.q_proj": (h, h, 0.02), "self_attn.k_proj": (kv, h, 0.02),
              "self_attn.v_proj": (kv, h, 0.02), "self_attn.o_proj": (h, h, out),
              "mlp.gate_proj": (f, h, 0.02), "mlp.up_proj": (f, h, 0.02), "mlp.down_proj": (h, f, out)}
    t = {f"model.layers.{i}.{n}.weight": (torch.randn(o, k, generator=gen) * std).half()
         for n, (o, k, std) in shapes.items()}
    t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return t


def build(a) -> Path:
    """The checkpoint under --dir (reused when a complete one of the same shape is there)."""
    d = Path(a.dir).expanduser()
    tok_src = Path(resolve_source(TOKENIZER_FROM))
    vocab = json.loads((tok_src / "config.json").read_text())["vocab_size"]
    config = llama_config(a, vocab)
    done = d / "BUILT"
    if done.is_file() and json.loads(done.read_text()) == config:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    per_shard = max(1, a.blocks_per_shard)
    n = math.ceil(a.layers / per_shard) + 1
    weight_map, total = {}, 0
    t0 = time.time()
    for s in range(n):
        if s < n - 1:
            tensors = {}
            for i in range(s * per_shard, min(a.layers, (s + 1) * per_shard)):
                tensors.update(block_tensors(i, a, gen))
        else:
            tensors = {"model.embed_tokens.weight": (torch.randn(vocab, a.hidden, generator=gen) * 0.02).half(),
                       "model.norm.weight": torch.ones(a.hidden, dtype=torch.float16),
                       "lm_head.weight": (torch.randn(vocab, a.hidden, generator=gen) * 0.02).half()}
        path = write_shard(d, s, n, tensors)
        weight_map.update({k: path.name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"shard {s + 1}/{n}: {path.stat().st_size / 1e9:.2f} GB ({time.time() - t0:.0f}s)", flush=True)
        del tensors
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps(config, indent=1))
    for f in tok_src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, d / f.name)
    done.write_text(json.dumps(config))
    return d


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def quantize(ckpt: Path, alloc: str, a) -> dict:
    out = Path(a.dir).expanduser().parent / f"scale-out-{alloc}"
    summary = out.with_suffix(".json")
    cmd = [sys.executable, str(ROOT / "cli.py"), "quantize", "llama", "--model", str(ckpt), "--bits",
           "4", "--alloc", alloc, "--stream", "--out", str(out), "--overwrite", "--json", str(summary),
           "--n-samples", str(a.n_samples), "--calib-seqlen", str(a.seqlen)]
    if alloc != "uniform":                   # the mixed job as the issue asks it: GPTQ, not the recipe's RSQ
        cmd += ["--method", a.mixed_method, "--bit-options", a.bit_options, "--no-mse"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_MININTERVAL": "30"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    timeline = []
    while True:                              # wait4: this child's own peak RSS when it ends
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        timeline.append((round(time.time() - t0, 1), rss_kib(proc.pid) // 1024))
        time.sleep(0.5)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)})")
    peak = usage.ru_maxrss * 1024
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    step = max(1, len(timeline) // 120)            # ~120 points, each the highest of its window
    timeline = [max(timeline[i:i + step], key=lambda x: x[1]) for i in range(0, len(timeline), step)]
    res = {"alloc": alloc, "command": " ".join(cmd[1:]), "checkpoint_bytes": ckpt_bytes,
           "peak_rss_bytes": peak, "peak_over_checkpoint": peak / ckpt_bytes, "wall_s": round(wall, 1),
           "rss_mib_over_time": timeline, "run": json.loads(summary.read_text()),
           "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    print(f"{alloc}: peak RSS {peak / 2**30:.2f} GiB = {100 * res['peak_over_checkpoint']:.1f}% of the "
          f"{ckpt_bytes / 1e9:.2f} GB checkpoint, {wall:.0f}s", flush=True)
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(cache_dir() / "scale" / "llama-synthetic"))
    p.add_argument("--layers", type=int, default=120)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--inter", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--blocks-per-shard", type=int, default=10)
    p.add_argument("--alloc", nargs="+", default=["uniform"])
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--mixed-method", default="gptq",
                   help="compressor of the mixed jobs, min-max grid (the llama recipe's own, RSQ "
                        "with an MSE grid, takes ~150 s a block here: ~7 h for 120 blocks)")
    p.add_argument("--bit-options", default="3:128,4:128,8", help="widths the mixed jobs choose from")
    p.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    p.add_argument("--json", default=str(default_path("scale")))
    a = p.parse_args()
    ckpt = build(a)
    rows = {alloc: quantize(ckpt, alloc, a) for alloc in a.alloc}
    save_rows(a.json, rows, __file__)


if __name__ == "__main__":
    main()
