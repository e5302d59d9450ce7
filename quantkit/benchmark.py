"""`quantkit bench`: prefill and decode speed and peak memory, quantized vs the original model.

Each variant (the quantized checkpoint, its source model in fp32 and in bf16) runs in a fresh
process, so that its peak resident memory is its own. Decode is greedy with a KV cache, one
token per step for every sequence of the batch; tokens/s count all sequences.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

VARIANTS = ("quantized", "fp32", "bf16")


def _rss_mib(field: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of this process, MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _load(variant: str, path: str, device: str, kernel: str):
    from quantkit.formats.io import read_manifest
    from quantkit.model.loader import load_model
    from quantkit.serve import load
    if variant == "quantized":
        return load(path, device=device, kernel=kernel, dtype=torch.bfloat16)
    source = read_manifest(path).get("source")
    if not source:
        raise QuantkitError(f"{path}: the manifest does not name its source model; bench only the "
                            "quantized variant with --variants quantized")
    return load_model(source, device, {"fp32": torch.float32, "bf16": torch.bfloat16}[variant])[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def _generate(model, ids: torch.Tensor, steps: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `steps` tokens) of greedy decoding with a KV cache."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # not 128 x vocab logits
    _sync(device)
    t1 = time.perf_counter()
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def measure(variant: str, path: str, batches: list[int], prompt: int, tokens: int,
            device: str = "cpu", kernel: str = "auto", repeats: int = 3) -> dict:
    """Speed and memory of one variant in this process (run it in a fresh one)."""
    from quantkit.model.loader import load_config, model_class
    torch.manual_seed(0)
    model_class(load_config(path))  # import the modeling code before the baseline
    rss0 = _rss_mib()
    model = _load(variant, path, device, kernel)
    vocab = model.config.get_text_config().vocab_size
    _generate(model, torch.randint(0, vocab, (1, 8), device=device), 2, device)  # prepare kernels
    res = {"variant": variant, "resident_mib": _rss_mib() - rss0, "batches": {}}
    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt), device=device)
        runs = [_generate(model, ids, tokens, device) for _ in range(repeats)]
        pre, dec = min(r[0] for r in runs), min(r[1] for r in runs)
        res["batches"][str(b)] = {"prefill_tok_s": b * prompt / pre, "decode_tok_s": b * tokens / dec,
                                  "decode_ms_per_step": 1e3 * dec / tokens}
    res["peak_rss_mib"] = _rss_mib("VmHWM") - rss0
    if device.startswith("cuda"):
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def bench(path: str | Path, batches: list[int], prompt: int = 128, tokens: int = 128,
          device: str = "cpu", kernel: str = "auto", variants=VARIANTS, repeats: int = 3) -> dict:
    """Run every variant in its own process; speedups at the first batch size."""
    path = Path(path)
    from quantkit.formats.io import read_manifest, weight_files
    read_manifest(path)  # a clear error before spawning anything
    out = {"checkpoint": str(path), "file_mib": sum(f.stat().st_size for f in weight_files(path)) / 2**20,
           "device": device, "torch_threads": torch.get_num_threads(), "prompt": prompt,
           "tokens": tokens, "variants": {}}
    for v in variants:
        args = json.dumps([v, str(path), batches, prompt, tokens, device, kernel, repeats])
        proc = subprocess.run([sys.executable, "-m", "quantkit.benchmark", args], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            raise QuantkitError(f"bench of the {v} model failed:\n{proc.stderr[-2000:]}")
        out["variants"][v] = json.loads(proc.stdout.strip().splitlines()[-1])
    q, first = out["variants"].get("quantized"), str(batches[0])
    if q:
        out["resident_over_file"] = q["resident_mib"] / out["file_mib"]
        for base in ("fp32", "bf16"):
            if base in out["variants"]:
                out[f"decode_speedup_vs_{base}"] = (q["batches"][first]["decode_tok_s"]
                                                    / out["variants"][base]["batches"][first]["decode_tok_s"])
    return out


if __name__ == "__main__":  # worker: one variant, JSON on the last stdout line
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
