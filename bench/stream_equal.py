"""Streaming on a real model: the default job (recipe `llama`, SmolLM2-135M) run in memory and
streamed (`stream=True`: weights read block by block from the checkpoint, outputs written
shard by shard), side by side; every tensor of the two outputs compared with torch.equal.

    python bench/stream_equal.py                         # --alloc ip, 32 calibration windows
    python bench/stream_equal.py --alloc uniform ip --n-samples 128

Writes bench/results/stream_equal.json (rows keyed by alloc): tensors compared, how many
differ (and the largest difference), each run's wall time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before transformers reads it

import quantkit  # noqa: E402
from bench.results_io import default_path, save_rows  # noqa: E402
from quantkit.formats.io import load_tensors  # noqa: E402


def compare(alloc: str, a) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="stream-equal-"))
    row: dict = {"recipe": "llama", "bits": a.bits, "alloc": alloc, "calib.n_samples": a.n_samples}
    try:
        for mode in ("memory", "stream"):
            t0 = time.time()
            quantkit.quantize("llama", bits=a.bits, alloc=alloc, stream=mode == "stream",
                              out=str(tmp / mode), progress=False, **{"calib.n_samples": a.n_samples})
            row[f"{mode}_seconds"] = round(time.time() - t0, 1)
            print(f"{alloc} {mode}: {row[f'{mode}_seconds']}s", flush=True)
        m, s = load_tensors(tmp / "memory"), load_tensors(tmp / "stream")
        differ = [k for k in m if k not in s or m[k].dtype != s[k].dtype or not torch.equal(m[k], s[k])]
        row.update(tensors=len(m), same_names=m.keys() == s.keys(), differing=len(differ),
                   first_differing=differ[:5],
                   max_abs_diff=max((float((m[k].double() - s[k].double()).abs().max())
                                     for k in differ if k in s and m[k].shape == s[k].shape), default=0.0),
                   streamed_shards=len(list((tmp / "stream").glob("*.safetensors"))))
        print(f"{alloc}: {row['tensors']} tensors, {row['differing']} differ", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alloc", nargs="+", default=["ip"])
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--json", default=str(default_path("stream_equal")))
    a = p.parse_args()
    save_rows(a.json, {alloc: compare(alloc, a) for alloc in a.alloc}, __file__)


if __name__ == "__main__":
    main()
