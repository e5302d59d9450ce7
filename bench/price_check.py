"""Does the mixed-precision price rank layers right? Measured against predicted, on SmolLM2-135M.

    python bench/price_check.py [--windows 8] [--eval-windows 8] [--bits 3,4]

The separable form prices a layer's error E = W - Q by Σ_o F_o (E H Eᵀ)_oo, F_o = E_t[g_to²]
the output Fisher, H = E_t[x_t x_tᵀ]: it assumes a token's gradient and its input error are
independent. The per-token coupled form E_t[Σ_o g_to² (E x_t)_o²] drops that assumption.
The separable form is the fisher sensitivity's price; `sink_free` is it with F and H over the
tokens after each window's first (the attention sink). All (and the plain proxy tr(E H Eᵀ)) are
computed on `--windows` fold-a calibration windows of 512 tokens for RTN (min-max, asymmetric,
g128) errors. Then every layer of one type (q_proj ... down_proj), or of one third of the
blocks, is RTN-quantized with all others fp32, and the measured increase of the mean next-token
loss on the fold-b domains' eval parts (unseen by the calibration) is set beside each summed
price. A sound price gives the same measured/predicted ratio for every set. Writes
bench/results/price_check.json.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from evals.suite import eval_ids, evaluate, fold_domains  # noqa: E402
from quantkit.calib.text import calibration_batches  # noqa: E402
from quantkit.model.discovery import set_weight_matrix, weight_matrix  # noqa: E402
from quantkit.model.loader import load_model  # noqa: E402
from quantkit.quant.rtn import rtn  # noqa: E402
from quantkit.types import QSpec  # noqa: E402
from results_io import default_path, save_rows  # noqa: E402

FORMS = ("separable", "sink_free", "coupled", "hessian")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_error(W, bits):
    return W - rtn(W, None, QSpec(bits=bits, group_size=128, mse=False)).dequantize()


def inputs_and_grads(model, batches, names):
    """Per layer: inputs x [tokens, in] and squared output gradients g² [tokens, out]."""
    X, G, handles = {}, {}, []
    for n in names:
        m = model.get_submodule(n)
        handles.append(m.register_forward_hook(
            lambda _m, inp, _o, n=n: X.setdefault(n, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
        handles.append(m.register_full_backward_hook(
            lambda _m, _gi, go, n=n: G.setdefault(n, []).append(go[0].detach().reshape(-1, go[0].shape[-1]) ** 2)))
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for ids in batches:                                   # one window at a time
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits.float()
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                            reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in X.items()}, {n: torch.cat(v) for n, v in G.items()}


def prices(model, batches, names, bits):
    X, G = inputs_and_grads(model, batches, names)
    T = sum(b[:, 1:].numel() for b in batches)
    tokens = torch.arange(sum(b.numel() for b in batches))
    later = tokens[tokens % batches[0].shape[1] != 0]        # every position but a window's first
    out = {}
    for n in names:
        W = weight_matrix(model.get_submodule(n)).detach().float()
        x, g2 = X.pop(n), G.pop(n)
        H, Fd = x.T @ x / x.shape[0], g2.sum(0) / T
        xl = x[later]
        Hl, Fl = xl.T @ xl / len(later), g2[later].sum(0) / len(later)
        out[n] = {}
        for b in bits:
            E = rtn_error(W, b)
            d = x @ E.T
            out[n][b] = {"separable": float((Fd * (E @ H * E).sum(1)).sum()),
                         "sink_free": float((Fl * (E @ Hl * E).sum(1)).sum()),
                         "coupled": float((g2 * d * d).sum() / T),
                         "hessian": float((E @ H * E).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="fold-a calibration windows of 512 tokens")
    ap.add_argument("--eval-windows", type=int, default=8, help="eval windows of 1024 tokens per domain")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args()
    torch.manual_seed(0)
    bits = [int(b) for b in a.bits.split(",")]
    t = time.time()
    model, tok, _ = load_model("smollm2-135m")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    pr = prices(model, calibration_batches(tok, "fold-a", a.windows, 512, 0, 1), names, bits)
    ev = {d: v for d, v in eval_ids(tok).items() if d in fold_domains("fold-b")}

    def nll():
        r = evaluate(model, tok, ev, windows=a.eval_windows)
        return sum(v["nll"] for v in r.values()) / len(r)

    base = nll()
    block = lambda n: int(n.split(".layers.")[1].split(".")[0])  # noqa: E731
    sets = {k: [n for n in names if n.endswith(k)] for k in TYPES}
    sets.update({f"blocks {i}-{i + 9}": [n for n in names if i <= block(n) < i + 10] for i in (0, 10, 20)})
    rows = {}
    spread = {}
    for b in bits:
        for key, ns in sets.items():
            saved = {n: weight_matrix(model.get_submodule(n)).detach().float().clone() for n in ns}
            for n, W in saved.items():
                set_weight_matrix(model.get_submodule(n), W - rtn_error(W, b))
            dnll = nll() - base
            for n, W in saved.items():
                set_weight_matrix(model.get_submodule(n), W)
            row = {"bits": b, "layers": len(ns), "dnll": dnll}
            for k in FORMS:
                row[k] = sum(pr[n][b][k] for n in ns)
                row[f"ratio_{k}"] = dnll / row[k]
            rows[f"{key} @{b}"] = row
            print(f"{key:12s} {b}-bit  dnll {dnll:.4f}  measured/predicted: " + "  ".join(
                f"{k} {row[f'ratio_{k}']:.3g}" for k in FORMS) + f"  ({time.time() - t:.0f} s)", flush=True)
            r = [v for v in rows.values() if v["bits"] == b]
            spread[f"{b}-bit"] = {k: max(v[f"ratio_{k}"] for v in r) / min(v[f"ratio_{k}"] for v in r)
                                  for k in FORMS}
            save_rows(a.out, {"fp32 nll": {"nll": base, "windows": a.windows, "eval_windows": a.eval_windows},
                              "ratio spread (max/min over the sets)": spread, **rows}, __file__)
    print("ratio spread (max/min over the sets):", spread)


if __name__ == "__main__":
    main()
