"""quantkit command line: quantize | prune | eval | inspect | export | bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bits(v: str) -> float:
    b = float(v)
    if not 1 <= b <= 16:
        raise argparse.ArgumentTypeError(f"bits must be between 1 and 16 (got {v}): a width of "
                                         "2, 3, 4 or 8, or an average budget with --alloc ip|baq|pareto")
    return int(b) if b == int(b) else b


def _options(v: str) -> list[int | str]:
    """Widths like 2,3,4,8, each optionally with its own group size: 3:64,4:128,8."""
    opts = []
    for x in v.split(","):
        bits, _, group = x.strip().partition(":")
        ok = bits in ("2", "3", "4", "8") and (not group or group.lstrip("-").isdigit())
        if not ok:
            raise argparse.ArgumentTypeError(f"bit options are widths among 2, 3, 4, 8, each optionally "
                                             f"BITS:GROUP like 4:64 (got {v})")
        opts.append(f"{bits}:{group}" if group else int(bits))
    return sorted(set(opts), key=lambda o: tuple(int(p) for p in str(o).split(":")))


def _ints(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16 (got {v})")
    return out


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pattern", help="N:M sparsity pattern for --prune (default 2:4)")
    p.add_argument("--calib-dataset", help="calibration corpus: mix (default: six domains), a bundled "
                                          "domain, fold-a | fold-b, a,b,... or a text file")
    p.add_argument("--calib", dest="calib_dataset", help="image models: zeroq | genie (synthetic, no data), "
                   "real (the testbed's images) or imagefolder:PATH")
    p.add_argument("--n-samples", type=int, help="calibration windows (default 128); images for image models")
    p.add_argument("--calib-seqlen", type=int, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--out", help="output directory (default out/NAME-wBITS-gGROUP-METHOD)")
    p.add_argument("--eval", action="store_true", help="measure perplexity afterwards")
    p.add_argument("--eval-dataset")
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json", help="write the summary to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier output")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run to --out from its "
                   "last finished block (the same model, data and recipe)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the weights block by block from the checkpoint's shards and write the "
                   "output as it goes (default: when the model in fp32 would take over half of --max-memory)")
    p.add_argument("--max-memory", help="memory budget, e.g. 8GB (default: the RAM available at start)")
    p.add_argument("--offload-activations", metavar="DIR", help="keep the calibration activations between "
                   "blocks in files under DIR (default: beside --out, when a streamed run's would not fit)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="default: the suite (all six bundled domains, ratios to fp32); "
                                     "one of austen | pydocs | pycode | fortunes | gcide | debref | "
                                     "wikitext2 | c4 | ptb | a text file; or mix | fold-a | fold-b | a,b,...")
    p.add_argument("--seqlen", type=int, help="eval window length (default 1024)")
    p.add_argument("--max-windows", type=int, help="one text: only its first N windows; the suite: N evenly "
                                                   "spaced windows per domain (default 16)")
    p.add_argument("--json", help="write the summary to this JSON file")
    p.add_argument("--device", help="cpu (default) or cuda")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantkit", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="quantize a model (recipe name, local dir or hub id)")
    q.add_argument("target", help="recipe name (recipes/NAME.yaml), YAML file, model dir or hub id")
    q.add_argument("--model", help="override the recipe's model (PATH_OR_HUB_ID)")
    q.add_argument("--method", help="rtn | gptq | gptq-baq | rsq | nupes | nupes-df | nupes-ste | llm-int8")
    q.add_argument("--bits", type=_bits)
    q.add_argument("--act-bits", type=int, help="image models: quantize every layer's input to this width")
    q.add_argument("--bn-reestimate", action=argparse.BooleanOptionalAction, default=None,
                   help="image models: after quantization, give every BN-folded layer's channels the fp "
                        "model's mean and std on the calibration images")
    q.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="image models: subtract from each layer's bias the mean output shift its "
                        "weight error causes on the calibration images")
    q.add_argument("--max-bops", type=float, help="image models with --alloc ip: a compute budget too, in "
                                                  "GBOPs (MACs x weight bits x input bits, summed)")
    q.add_argument("--group-size", type=int, help="-1 for one group per output row")
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="search each group's grid for the lowest squared error (2-3x GPTQ's time) "
                        "instead of min-max")
    q.add_argument("--alloc", help="bit allocation: uniform (default) | ip | baq | pareto")
    q.add_argument("--bit-options", type=_options, help="widths a layer may get (default: the recipe's; 2,3,4,8 without one); BITS:GROUP gives an option "
                        "its own group size, e.g. 3:64,4:128,8")
    q.add_argument("--tie-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: one width for layers serving engines fuse (q/k/v, gate/up)")
    q.add_argument("--sensitivity", help="cost table for allocation: hessian (default) | fisher | trace | kl")
    q.add_argument("--report", help="write the allocation report (JSON + PNG plots) to this directory")
    q.add_argument("--prune", help="N:M-prune first: magnitude | wanda | sparsegpt | armor (then quantize "
                                   "the kept weights with GPTQ, the mask fixed)")
    _add_run_args(q)
    pr = sub.add_parser("prune", help="N:M semi-structured pruning (kept weights in fp16)")
    pr.add_argument("target", help="recipe name (recipes/NAME.yaml), YAML file, model dir or hub id")
    pr.add_argument("--model", help="override the recipe's model (PATH_OR_HUB_ID)")
    pr.add_argument("--method", default="armor", help="armor (default) | sparsegpt | wanda | magnitude")
    pr.add_argument("--block-size", type=int, help="armor: wrapper block size (default 32)")
    pr.add_argument("--iters", type=int, help="armor: coordinate descent iterations per layer (default 3000)")
    _add_run_args(pr)
    e = sub.add_parser("eval", help="perplexity of a quantized output, recipe's model or checkpoint")
    e.add_argument("target")
    e.add_argument("--kernel", default="reference",
                   help="kernel for quantized layers: reference (exact, default), auto (fast path)")
    _add_eval_args(e)
    i = sub.add_parser("inspect", help="per-layer bits, group size and effective bits per weight")
    i.add_argument("target")
    i.add_argument("--json", help="write the summary to this JSON file")
    x = sub.add_parser("export", help="rewrite a checkpoint for other tools (vLLM, GPTQ loaders)")
    x.add_argument("target", help="a quantkit checkpoint directory")
    x.add_argument("--format", required=True, help="compressed-tensors (pack-quantized) | gptq (v1) | bnb-int8")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier output")
    b = sub.add_parser("bench", help="prefill/decode tokens/s and peak memory vs the fp32 and bf16 model")
    b.add_argument("target", help="a quantkit checkpoint directory")
    b.add_argument("--batch", type=_ints, default=[1, 16], help="batch sizes (default 1,16)")
    b.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    b.add_argument("--tokens", type=int, default=128, help="decoded tokens per sequence (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="best of N runs (default 3)")
    b.add_argument("--variants", type=lambda v: v.split(","), default=["quantized", "fp32", "bf16"])
    b.add_argument("--kernel", default="auto", help="auto (default) or a kernel name, e.g. reference")
    b.add_argument("--device", help="cpu (default) or cuda")
    b.add_argument("--json", help="write the results to this JSON file")
    return ap


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def cmd_quantize(a) -> dict:
    import quantkit
    from evals.data import domains, load_text
    from quantkit.image_run import is_image_source
    from quantkit.recipe import load_recipe
    r = load_recipe(a.target)
    if a.cmd == "prune":
        r = r.with_overrides(prune=a.method, bits=16, **{"armor.block_size": a.block_size,
                                                          "armor.iters": a.iters})
    else:
        r = r.with_overrides(method=a.method, bits=a.bits, act_bits=a.act_bits, max_bops=a.max_bops,
                             bn_reestimate=a.bn_reestimate, bias_correction=a.bias_correction,
                             group_size=a.group_size, sym=a.sym, mse=a.mse,
                             act_order=a.act_order, alloc=a.alloc, bit_options=a.bit_options,
                             tie_fused=a.tie_fused, sensitivity=a.sensitivity, report=a.report,
                             prune=a.prune)
    r = r.with_overrides(model=a.model, seed=a.seed, pattern=a.pattern, device=a.device,
                         stream=a.stream, max_memory=a.max_memory,
                         offload_activations=a.offload_activations, **{"calib.dataset": a.calib_dataset,
                                             "calib.n_samples": a.n_samples,
                                             "calib.seqlen": a.calib_seqlen,
                                             "eval.dataset": a.eval_dataset,
                                             "eval.max_windows": a.max_windows})
    name = Path(a.target).stem if a.model is None else Path(r.model).name
    r = r.with_overrides(out=a.out or f"out/{name}-{_run_name(r)}")
    if is_image_source(r.model):
        return _quantize_image(r, a)
    texts = [load_text(d, "eval") for d in domains(r.eval.dataset)] if a.eval else None  # fail early
    rep = quantkit.quantize(r, overwrite=a.overwrite, resume=a.resume)
    summary = {k: v for k, v in rep.to_dict().items() if k != "layers"}
    if a.eval and rep.model is None:             # streamed: the model is in the output only
        rep.model = quantkit.load(r.out)
    if a.eval and len(texts) == 1:
        from quantkit.evaluate import text_perplexity
        summary.update(text_perplexity(rep.model, rep.tokenizer, texts[0], r.eval.seqlen,
                                       r.eval.max_windows), dataset=r.eval.dataset, seqlen=r.eval.seqlen)
    elif a.eval:
        from quantkit.evaluate import suite_perplexity
        from quantkit.model.loader import resolve_source
        res = suite_perplexity(rep.model, rep.tokenizer, r.eval.dataset, resolve_source(r.model),
                               r.eval.seqlen, r.eval.max_windows)
        _print_suite(res)
        summary.update(dataset=res["dataset"], ppl=res["geomean_ppl"], suite={"target": a.target, **res})
    print(f"compressed {rep.n_layers} linears of {r.model} with {rep.method} in {rep.seconds:.1f}s: "
          f"{rep.bits_per_weight:.3f} bits/weight, {rep.original_size_bytes / 2**20:.1f} MiB (fp32) -> "
          f"{rep.size_bytes / 2**20:.1f} MiB -> {r.out}"
          + (f"; ppl {summary['ppl']:.3f} on {summary['dataset']}" if a.eval else "")
          + (f" (geomean of the domains, x{summary['suite']['geomean_ratio']:.3f} of fp32)"
             if "suite" in summary else ""))
    return summary


def _quantize_image(r, a) -> dict:
    import quantkit
    from quantkit.image_run import evaluate_image
    rep = quantkit.quantize(r, overwrite=a.overwrite)
    summary = rep.to_dict()
    print(f"quantized {rep.n_layers} layers of {r.model} with {rep.method} (W{rep.bits}"
          f"{'' if rep.act_bits is None else f'A{rep.act_bits}'}, calibration: {rep.calib}) in "
          f"{rep.seconds:.1f}s ({rep.calib_seconds:.1f}s of it calibration data): "
          f"{rep.bits_per_weight:.3f} bits/weight, {rep.size_bytes / 2**20:.2f} MiB -> {r.out}")
    if a.eval:
        summary["eval"] = evaluate_image(r.out, a.eval_dataset)
        _print_image_eval(summary["eval"])
    return summary


def _print_image_eval(res: dict) -> None:
    parts = [f"{k} {res[k]:.4f}" for k in ("top1", "top5", "agreement_top1", "agreement_top5", "kl")
             if k in res]
    fp = res.get("fp32")
    print(f"{res['target']}: {', '.join(parts)} on {res['images']} images ({res['dataset']})"
          + (f"; fp32 top1 {fp['top1']:.4f}, top5 {fp['top5']:.4f}" if fp else ""))


def _run_name(r) -> str:
    """Default output name: w4-g128-gptq, w4-g128-gptq-ip, w4-rsq-ip (options with their own groups),
    2:4-armor, 2:4-armor-w4-g128; images w4a8-rtn-zeroq."""
    from quantkit.image_run import is_image_source
    if r.act_bits is not None or is_image_source(r.model):
        act = "" if r.act_bits is None else f"a{r.act_bits}"
        return f"w{r.bits}{act}-{r.method}-{r.calib.dataset.split(':')[0]}"
    quant = f"w{r.bits}-g{r.group_size}"
    if r.prune is not None:
        return f"{r.pattern.replace(':', '')}-{r.prune}" + ("" if r.bits == 16 else f"-{quant}")
    if r.alloc != "uniform" and all(":" in str(o) for o in r.bit_options):
        quant = f"w{r.bits}"                     # every option has its own group size
    return f"{quant}-{r.method}" + ("" if r.alloc == "uniform" else f"-{r.alloc}")


def cmd_eval(a) -> dict:
    """One corpus or file: its perplexity. No --dataset or a composite (mix, fold-a, a,b): the
    suite, every domain as a ratio to the fp32 original and the geometric mean."""
    from quantkit.evaluate import evaluate_target
    from quantkit.image_run import evaluate_image, is_image_checkpoint, is_image_source
    from quantkit.pipeline import check_device
    if is_image_checkpoint(a.target) or is_image_source(a.target):
        res = evaluate_image(a.target, a.dataset)
        _print_image_eval(res)
        return res
    res = evaluate_target(a.target, a.dataset, a.seqlen, a.max_windows,
                          str(check_device(a.device or "cpu")), a.kernel)
    if res.pop("suite", False):
        _print_suite(res)
    else:
        print(f"{a.target}: ppl {res['ppl']:.4f} on {res['dataset']} "
              f"({res['tokens']} tokens, {res['windows']} windows of {res['seqlen']})")
    return res


def _print_suite(res: dict) -> None:
    print(f"{'domain':10s} {'ppl':>9s} {'fp32':>9s} {'x fp32':>7s}")
    for d, r in res["domains"].items():
        print(f"{d:10s} {r['ppl']:9.3f} {r.get('fp32_ppl', r['ppl']):9.3f} {r.get('ratio', 1.0):7.3f}")
    print(f"{'geomean':10s} {res['geomean_ppl']:9.3f} {'':9s} {res.get('geomean_ratio', 1.0):7.3f}   "
          f"({res['windows']} windows of {res['seqlen']} tokens per domain)")


def cmd_inspect(a) -> dict:
    from quantkit.formats.io import inspect_checkpoint
    res = inspect_checkpoint(a.target)
    print(f"{'layer':60s} {'fmt':6s} {'bits':>4s} {'group':>5s} {'bpw':>6s}")
    for name, r in res.pop("per_layer").items():
        print(f"{name:60s} {r['format']:6s} {'-' if r['bits'] is None else r['bits']:>4} "
              f"{'-' if r['group_size'] is None else r['group_size']:>5} {r['bpw']:6.3f}")
    print(f"{res['layers']} compressed linears, {res['weights']} weights, "
          f"{res['bits_per_weight']:.4f} effective bits per weight")
    if "wrapped_layers" in res:
        print(f"ARMOR wrappers on {res['wrapped_layers']} linears: {res['wrapper_params']} parameters "
              f"(+{100 * res['wrapper_params_over_dense']:.2f}% of the dense weights); "
              f"{res['wrapper_flops_per_token']} FLOPs per token (+{100 * res['wrapper_flops_over_core']:.1f}% "
              f"over the sparse cores, {100 * res['wrapped_flops_over_dense']:.1f}% of dense in all)")
    return res


def cmd_export(a) -> dict:
    from quantkit.formats.export import export
    res = export(a.target, a.out, a.format, a.overwrite)
    print(f"exported {res['layers']} linears ({', '.join(f'{n} {k}' for k, n in res['schemes'].items())}) "
          f"as {a.format} -> {a.out}")
    if res.get("note"):
        print(f"note: {res['note']}")
    if res["promoted_to_8_bits"]:
        print(f"note: {len(res['promoted_to_8_bits'])} layers stored at 8 bits (same values) because a layer "
              f"fused with them is 8-bit: {', '.join(res['promoted_to_8_bits'][:6])}"
              + (" ..." if len(res["promoted_to_8_bits"]) > 6 else ""))
    return res


def cmd_bench(a) -> dict:
    from quantkit.benchmark import VARIANTS, bench
    from quantkit.errors import QuantkitError
    from quantkit.pipeline import check_device
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        raise QuantkitError(f"unknown variants {bad}; choose among {', '.join(VARIANTS)}")
    device = str(check_device(a.device or "cpu"))
    res = bench(a.target, a.batch, a.prompt, a.tokens, device, a.kernel, a.variants, a.repeats)
    print(f"{'variant':10s} {'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak MiB':>9s}")
    for v, r in res["variants"].items():
        for bsz, m in r["batches"].items():
            print(f"{v:10s} {bsz:>5s} {m['prefill_tok_s']:14.1f} {m['decode_tok_s']:13.1f} "
                  f"{r['peak_rss_mib']:9.1f}")
    for base in ("fp32", "bf16"):
        if f"decode_speedup_vs_{base}" in res:
            print(f"decode speedup at batch {a.batch[0]} vs {base}: {res[f'decode_speedup_vs_{base}']:.2f}x")
    if "resident_over_file" in res:
        print(f"quantized model resident after loading: {res['resident_over_file']:.2f}x its file "
              f"({res['file_mib']:.1f} MiB); peak above counts activations and KV cache too")
    return res


def main(argv: list[str] | None = None) -> int:
    from quantkit.errors import QuantkitError
    a = build_parser().parse_args(argv)
    try:
        out = {"quantize": cmd_quantize, "prune": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "export": cmd_export,
               "bench": cmd_bench}[a.cmd](a)
        _write_json(getattr(a, "json", None), out)
    except QuantkitError as e:
        print(f"quantkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
