"""What every peer worker shares: its arguments, the timed quantization step, the dense checkpoint.

A worker runs in its tool's own virtual environment, so this module needs only torch,
transformers and safetensors (no quantkit). Protocol:

    python bench/peers/<tool>_worker.py MODEL_DIR CALIB_PT BITS GROUP OUT_DIR [--options JSON]

CALIB_PT is a LongTensor [n, seqlen] of calibration tokens ("-" for data-free tools). The
worker writes OUT_DIR as a Hugging Face checkpoint (the original's config and tokenizer, the
quantized linears replaced by their dequantized fp32 weights) and prints one JSON line last
on stdout: quant_seconds (the tool's quantize call alone), peak_rss_mb (the worker's peak
resident memory right after that call; rss_before_mb: the peak before it, model loaded),
version, and whatever the tool adds; on failure
{"error": "<Type>: <first line>"} and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

BLOCK_LINEAR = re.compile(r"^model\.layers\.\d+\.")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("calib")
    ap.add_argument("bits", type=int)
    ap.add_argument("group_size", type=int)
    ap.add_argument("out_dir")
    ap.add_argument("--options", default="{}", help="tool-specific options as JSON")
    a = ap.parse_args(argv)
    a.options = json.loads(a.options)
    return a


def set_threads() -> None:
    """Honour OMP_NUM_THREADS in torch too (the parent sets it for --threads)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n:
        import torch
        torch.set_num_threads(int(n))


def load_model(model_dir: str):
    """The fp32 original and its tokenizer, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def load_calib(path: str):
    """Calibration tokens [n, seqlen] (LongTensor), or None for "-"."""
    import torch
    return None if path == "-" else torch.load(path)


def block_linears(model) -> dict:
    """The decoder blocks' nn.Linear layers by qualified name (what every tool quantizes)."""
    import torch
    return {n: m for n, m in model.named_modules()
            if BLOCK_LINEAR.match(n) and isinstance(m, torch.nn.Linear)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MiB.

    Not getrusage's ru_maxrss: Linux carries that across exec, so a worker would start at the
    RSS of the parent it was forked from. VmHWM belongs to the address space exec made."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024                                  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # not Linux


def timed(fn, *args, **kwargs):
    """(fn's result, its wall seconds, peak RSS in MiB of this process right after it).

    The peak before the call (model loaded) goes to LAST["rss_before_mb"]: what the tool's
    call itself added is the difference."""
    LAST["rss_before_mb"] = peak_rss_mb()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, peak_rss_mb()


LAST: dict = {}


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def save_dense(model_dir: str, weights: dict, out_dir: str) -> None:
    """OUT_DIR: the original checkpoint with `weights` ({linear name: dense [out, in]}) in place
    of its linears' weights, every tensor fp32, and its other files (config, tokenizer) copied."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    missing = [n for n in weights if f"{n}.weight" not in tensors]
    if missing:
        raise KeyError(f"no tensor in {model_dir} for {missing[:3]}")
    for n, w in weights.items():
        tensors[f"{n}.weight"] = w.detach().to("cpu", torch.float32).contiguous()
    save_file({k: v.float().contiguous() if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def report(info: dict) -> None:
    """The result line the parent reads: last on stdout."""
    print(json.dumps(info), flush=True)


def main(quantize) -> None:
    """Run `quantize(args) -> (weights, info)` and save; report its info or its error."""
    args = parse_args()
    try:
        set_threads()
        weights, info = quantize(args)
        info.update(LAST)
        info["peak_rss_total_mb"] = None
        save_dense(args.model_dir, weights, args.out_dir)
        info["peak_rss_total_mb"] = peak_rss_mb()
    except BaseException as e:  # noqa: BLE001  (the parent records whatever stopped the tool)
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        report({"error": f"{type(e).__name__}: {first}"})
        sys.exit(1)
    report(info)
