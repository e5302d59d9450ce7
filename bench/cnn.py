"""Image models, W8A8 / W4A8 / W4A4, calibrated on real images, ZeroQ images or Genie images,
each with plain rounding (RTN or GPTQ with calibrated activation ranges) and with Genie-M.

    python bench/cnn.py --testbed resnet            # Fashion-MNIST ResNet: true top-1
    python bench/cnn.py --testbed efficientnet-lite0 # ImageNet weights: top-1 agreement with fp32

Writes bench/results/cnn.json (rows keyed testbed/calib/wXaY/method), merged over earlier rows.
Distillation is run once per testbed and data source and reused by every row; its seconds per
256 images are recorded, and each data-free row's total time (distillation + quantization).
--cache DIR keeps the distilled images (keyed by every setting that makes them) for later runs.
--variants plain,bc,bnre,bc+bnre: each row also with bias correction and/or BN re-estimation
(keys end in "+bc", "+bnre", "+bc+bnre").
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results_io import default_path, save_rows  # noqa: E402
from evals.classify import agreement, logits, topk_accuracy  # noqa: E402
from evals.testbeds import TESTBEDS  # noqa: E402
from quantkit.calib.synthetic import distill  # noqa: E402
from quantkit.image import quantize_image_model  # noqa: E402

CONFIGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w3a3": (3, 3), "w2a4": (2, 4)}


def measure(model, fp_logits, x, labels, pre) -> dict:
    out = logits(model, x, pre)
    res = agreement(out, fp_logits)
    if labels is not None:
        res.update(topk_accuracy(out, labels))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default="resnet", choices=sorted(TESTBEDS))
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--calibs", default="real,zeroq,genie")
    ap.add_argument("--configs", default="w8a8,w4a8,w4a4")
    ap.add_argument("--methods", default="rtn,gptq,genie-m")
    ap.add_argument("--zeroq-iters", type=int, default=500)
    ap.add_argument("--genie-iters", type=int, default=200)
    ap.add_argument("--genie-width", type=int, default=128, help="generator channels")
    ap.add_argument("--genie-class-weight", type=float, default=0.0,
                    help="Genie: weight of a cross-entropy term toward a random class per image")
    ap.add_argument("--genie-m-iters", type=int, default=1000)
    ap.add_argument("--genie-m-options", default="{}",
                    help='more Genie-M options as JSON, e.g. \'{"lr_round": 0.02, "start": "gptq"}\'')
    ap.add_argument("--batch", type=int, default=128, help="distillation batch")
    ap.add_argument("--eval-max", type=int, default=None, help="first N eval images only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="keep / reuse distilled images in this directory")
    ap.add_argument("--variants", default="plain",
                    help="comma list of plain | bc (bias correction) | bnre (BN re-estimation) | bc+bnre")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    bed = TESTBEDS[a.testbed]
    fp, pre = bed["load"]()
    fp.eval()
    x_eval, labels = bed["eval_data"]()
    if a.eval_max:
        x_eval = x_eval[:a.eval_max]
        labels = None if labels is None else labels[:a.eval_max]
    fp_logits = logits(fp, x_eval, pre)
    rows = {f"{a.testbed}/fp32": {**({} if labels is None else topk_accuracy(fp_logits, labels)),
                                  "images": len(x_eval)}}
    print(rows)
    data, distill_s = {}, {}
    for c in a.calibs.split(","):
        t = time.time()
        if c == "real":
            data[c] = pre(bed["calib_data"](a.n_calib, a.seed + 1))
        else:
            iters = a.zeroq_iters if c == "zeroq" else a.genie_iters
            extra = {"width": a.genie_width} if c == "genie" else {}
            if c == "genie" and a.genie_class_weight:
                extra["class_weight"] = a.genie_class_weight
            hist = []
            key = f"{a.testbed}-{c}-n{a.n_calib}-i{iters}-b{a.batch}-s{a.seed}" + \
                (f"-w{a.genie_width}" if c == "genie" else "") + \
                (f"-cw{a.genie_class_weight:g}" if "class_weight" in extra else "")
            cached = Path(a.cache) / f"{key}.pt" if a.cache else None
            if cached is not None and cached.exists():
                saved = torch.load(cached)
                data[c], hist, took = saved["x"], saved["history"], saved["seconds"]
            else:
                data[c] = distill(fp, c, a.n_calib, seed=a.seed, history=hist, iterations=iters,
                                  batch_size=a.batch, **extra)
                took = time.time() - t
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"x": data[c], "history": hist, "seconds": took}, cached)
            distill_s[c] = took
            rows[f"{a.testbed}/distill/{c}"] = {
                "seconds": distill_s[c], "seconds_per_256": distill_s[c] * 256 / a.n_calib,
                "iterations": iters, "batch": a.batch, "n": a.n_calib, **extra,
                "loss_first_last": hist, "finite": bool(torch.isfinite(data[c]).all())}
            print(c, rows[f"{a.testbed}/distill/{c}"])
    for cfg in a.configs.split(","):
        w, act = CONFIGS[cfg]
        for c, x in data.items():
            for meth, var in ((m, v) for m in a.methods.split(",") for v in a.variants.split(",")):
                post = set(var.split("+")) - {"plain"}
                model = copy.deepcopy(fp)
                opts = ({"iterations": a.genie_m_iters, **json.loads(a.genie_m_options)}
                        if meth == "genie-m" else None)
                rep = quantize_image_model(model, x, bits=w, act_bits=act, method=meth,
                                           n_calib=len(x), seed=a.seed, method_options=opts,
                                           bn_reestimate="bnre" in post,
                                           bias_correction="bc" in post, progress=False)
                res = measure(model, fp_logits, x_eval, labels, pre)
                res.update(quantize_seconds=rep.seconds, bits_per_weight=rep.bits_per_weight,
                           total_seconds=rep.seconds + distill_s.get(c, 0.0),
                           genie_m_iterations=a.genie_m_iters if meth == "genie-m" else None,
                           genie_m_options=opts, method_info=rep.settings["method_info"])
                key = f"{a.testbed}/{c}/{cfg}/{meth}" + "".join(f"+{v}" for v in ("bc", "bnre") if v in post)
                rows[key] = res
                print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()},
                      flush=True)
                save_rows(a.out, rows, __file__)
    save_rows(a.out, rows, __file__)


if __name__ == "__main__":
    main()
