"""RTN vs GPTQ perplexity on SmolLM2-135M (offline asset), written to bench/results/.

    python bench/ppl_table.py [--max-windows 40] [--configs 4:128,4:-1,3:128,2:64]

Calibration: 128 x 512 tokens of the austen calibration books; eval: the first
max-windows 1024-token windows of Pride and Prejudice (never in calibration).
"""
from __future__ import annotations

import time

from ppl_common import table_parser, table_setup, write_row
from evals.perplexity import perplexity
from quantkit.pipeline import run
from results_io import default_path  # noqa: E402


def main() -> None:
    ap = table_parser(str(default_path(__file__)), 40)
    ap.add_argument("--configs", default="3:128,4:128,4:-1,2:64")
    ap.add_argument("--methods", default="rtn,gptq")
    a = ap.parse_args()
    base, overrides, path, results, ids = table_setup(a)
    ev = lambda m: perplexity(m, ids, base.eval.seqlen, a.max_windows)  # noqa: E731
    for cfg in a.configs.split(","):
        bits, gs = (int(x) for x in cfg.split(":"))
        for method in a.methods.split(","):
            key = f"{method}{a.label} w{bits} g{gs}"
            if key in results:
                continue
            r = base.with_overrides(method=method, bits=bits, group_size=gs, out=None, **overrides)
            t = time.time()
            rep = run(r, progress=False)
            res = ev(rep.model)
            res.update(seconds=time.time() - t, bits_per_weight=rep.bits_per_weight,
                       recipe=r.to_dict(), ratio=res["ppl"] / results["fp32"]["ppl"])
            results = write_row(path, results, key, res)
            print(f"{key}: ppl {res['ppl']:.3f} (x{res['ratio']:.3f}) {res['bits_per_weight']:.3f} bpw "
                  f"{res['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
