"""GPTQ speed: quantkit's GPTQ vs a plain textbook implementation written here, same inputs.

    python bench/gptq_speed.py [--size 4096] [--tokens 2048] [--bits 4] [--group-size 128]

The textbook version follows the paper's Algorithm 1 (lazy batches of 128 columns,
rank-1 updates over the whole batch, columns sliced from W [out, in]). Reports the time
ratio and the fraction of identical codes; writes bench/results/gptq_speed.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from quantkit.quant.base import QSpec
from quantkit.quant.gptq import gptq_codes, inverse_hessian_factor
from quantkit.quant.grid import fit_grid, quantize
from results_io import default_path, save_rows  # noqa: E402


def textbook(W: torch.Tensor, H: torch.Tensor, spec: QSpec, block: int = 128) -> torch.Tensor:
    W, H = W.clone().float(), H.clone().float()
    in_f = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(H, spec.damp)
    gw = in_f if spec.group_size <= 0 else spec.group_size
    Q = torch.zeros_like(W)
    s = z = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            if (i1 + i) % gw == 0:
                s, z = fit_grid(W1[:, i:i + gw], spec.bits, spec.sym, spec.mse)
            w, d = W1[:, i], U[i1 + i, i1 + i]
            q = quantize(w, s, z, spec.bits)
            Q[:, i1 + i] = q
            err = (w - (q - z) * s) / d
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i:i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q.int()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    torch.manual_seed(0)
    n = a.size
    W = torch.randn(n, n) / n ** 0.5
    X = torch.randn(a.tokens, n) @ (torch.eye(n) + 0.05 * torch.randn(n, n))
    H = X.T @ X / a.tokens
    spec = QSpec(bits=a.bits, group_size=a.group_size, act_order=False, mse=False)
    ref, t_ref, ts_ref = timed(lambda: textbook(W, H, spec), a.repeats)
    ours, t_ours, ts_ours = timed(lambda: gptq_codes(W, H, spec)[0], a.repeats)
    same = float((ours == ref).float().mean())
    res = {"shape": [n, n], "tokens": a.tokens, "bits": a.bits, "group_size": a.group_size,
           "threads": torch.get_num_threads(), "textbook_s": t_ref, "quantkit_s": t_ours,
           "speedup": t_ref / t_ours, "identical_codes": same, "textbook_runs": ts_ref,
           "quantkit_runs": ts_ours}
    print(json.dumps(res, indent=2))
    save_rows(a.out, res, __file__, merge=False)


if __name__ == "__main__":
    main()
