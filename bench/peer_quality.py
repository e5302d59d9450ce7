"""Peer quantization tools against quantkit on SmolLM2-135M: one evaluator, one calibration,
the out-of-domain protocol; quality, bits per weight, quantization time and peak memory.

    python bench/peer_quality.py [--tools rtn,hqq,bnb-nf4,llmcompressor-gptq,gptqmodel,quantkit]
        [--configs 4:64,3:64] [--n-samples 128] [--max-windows 16] [--threads N]
        [--set KEY=VALUE ...] [--quantkit-variant NAME:KEY=VALUE,KEY=VALUE ...]
        [--out bench/results/peer_quality.json]

Tools. Each peer runs as a worker script (bench/peers/<tool>_worker.py) with the python of its
own virtual environment, ~/.cache/quantkit/peers/<venv>/venv, made on first use (torch 2.13.0
first, then the pinned peer under constraints-cpu.txt, so no CUDA torch is ever pulled) and
reused after. rtn, bnb-nf4 and quantkit use the main venv, in a worker process too, so that
every row's time and memory are measured the same way. A worker quantizes every decoder-block
linear (lm_head / the tied embedding stay fp32) and writes a Hugging Face checkpoint of the
DEQUANTIZED weights; this process loads it with from_pretrained(dtype=float32) and evaluates
it, then deletes it.

  rtn                 quantkit recipe llama with method=rtn, mse=false: asymmetric min-max
  hqq                 hqq's HQQLinear, BaseQuantizeConfig(nbits, group_size), its defaults
  bnb-nf4             bitsandbytes quantize_4bit(nf4, blocksize=group) on CPU; 4-bit only
  llmcompressor-gptq  llm-compressor oneshot + GPTQModifier, symmetric int, group, no lm_head
  gptqmodel           GPTQModel's GPTQ on CPU (torch backend), its QuantizeConfig defaults
  quantkit            quantkit's pipeline, recipe llama + --set overrides (+ each variant)

Protocol (evals/suite.py). Calibration tokens are drawn here once per fold with
calibration_batches(tok, fold, n_samples, 512, seed 0, batch 8) and handed to the workers as a
[n, 512] tensor (quantkit draws the same ones itself). A calibrated tool is run twice,
calibrated on fold-a and on fold-b; each domain is scored by the run calibrated on the other
fold. Calibration-free tools (rtn, hqq, bnb-nf4) run once and are scored on all six domains.
Perplexity: evals.suite.evaluate, `--max-windows` evenly spaced windows of 1024 tokens per
domain; the fp32 model is scored on the same windows (cached in the results file per window
count). Headline: ood_geomean, the geometric mean over the six domains of ppl / fp32 ppl.

Each row also has: bits_per_weight and the formula used, quant_seconds (the tool's quantize
call alone, inside the worker; for rtn / quantkit the whole run(), which includes loading the
model and tokenizing the calibration text), peak_rss_mb (the worker's peak resident memory
right after that call, VmHWM; rss_before_mb: its peak before the call, the model loaded;
peak_rss_total_mb: the whole worker, saving included), levels_max (the most
distinct values any group of `group_size` consecutive weights has: at most 2**bits), and the
tool's versions; per fold under "runs", and in the row: quant_seconds the mean, peak_rss_mb
and levels_max the largest. A tool that fails gets a row with its error, a width it lacks a
row that says so; the file is written after every row (merged with what it holds). Rows are
keyed "<tool> w<bits>g<group>" ("quantkit:<variant> w4g64"): a rerun replaces its rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ppl_common import parse_sets, write_row  # noqa: F401  (sets the offline env)
from results_io import default_path, load_rows

import torch

from evals.suite import FOLDS, WINDOWS, eval_ids, evaluate, fold_domains, geomean, other_fold

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
CACHE = Path("~/.cache/quantkit/peers").expanduser()
CONSTRAINTS = ROOT / "constraints-cpu.txt"
TORCH = "2.13.0"                       # the CPU build in /opt/wheels; constraints-cpu.txt pins it
SEQLEN = 512
BLOCK_PREFIX = "model.layers."


@dataclass(frozen=True)
class Tool:
    worker: str
    calibrated: bool
    venv: str | None = None            # None: the main venv
    packages: tuple = ()               # pip requirements of the venv (after torch)
    dists: tuple = ()                  # distributions whose versions the row records
    bits: tuple = (2, 3, 4, 5, 6, 8)   # widths the tool has
    options: dict = field(default_factory=dict)
    pip_env: dict = field(default_factory=dict)   # environment of its pip install


TOOLS = {
    "rtn": Tool("quantkit_worker.py", False, dists=("quantkit",),
                options={"overrides": {"method": "rtn", "mse": False}}),
    "hqq": Tool("hqq_worker.py", False, "hqq", ("hqq==0.2.8.post1",), ("hqq",)),
    "bnb-nf4": Tool("bnb_worker.py", False, dists=("bitsandbytes",), bits=(4,)),
    "llmcompressor-gptq": Tool("llmcompressor_worker.py", True, "llmcompressor",
                               ("llmcompressor==0.14.0.1",), ("llmcompressor", "compressed-tensors")),
    # 7.7.0 needs torch>=2.14.1; 7.6.0 is the newest release that takes torch 2.13
    "gptqmodel": Tool("gptqmodel_worker.py", True, "gptqmodel", ("gptqmodel==7.6.0",), ("gptqmodel",),
                      pip_env={"BUILD_CUDA_EXT": "0"}),
    "quantkit": Tool("quantkit_worker.py", True, dists=("quantkit",)),
}
NOT_SUPPORTED = {"bnb-nf4": "NF4 is a 4-bit format: bitsandbytes has no 3-bit (or other) NF grid"}


# ---------------------------------------------------------------- virtual environments

def _pip(py: Path, args: list[str], log, env: dict | None = None) -> None:
    log.write(f"$ pip {' '.join(args)}\n")
    log.flush()
    p = subprocess.run([str(py), "-m", "pip", *args], stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise RuntimeError(f"pip {' '.join(args)} failed (exit {p.returncode}); see {log.name}")


def _versions(py: Path, dists) -> dict:
    code = ("import json,sys; from importlib import metadata as m\n"
            "def v(d):\n    try: return m.version(d)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({d: v(d) for d in sys.argv[1:]}))")
    out = subprocess.run([str(py), "-c", code, *dists], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _install(tool: Tool, home: Path, py: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "install.log", "a") as log:
        if not py.exists():
            log.write(f"$ {sys._base_executable} -m venv {home / 'venv'}\n")
            subprocess.run([sys._base_executable, "-m", "venv", str(home / "venv")], check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        _pip(py, ["install", f"torch=={TORCH}"], log)      # first: the CPU build on disk
        _pip(py, ["install", "-c", str(CONSTRAINTS), *tool.packages], log, tool.pip_env)


def ensure_venv(tool: Tool) -> tuple[str, dict]:
    """(python of the tool's venv, its versions); installs the venv when missing or stale."""
    dists = ("torch", "transformers", *tool.dists)
    if tool.venv is None:
        return sys.executable, {d: _version(d) for d in dists}
    home = CACHE / tool.venv
    py, marker = home / "venv" / "bin" / "python", home / "installed.json"
    if not (marker.exists() and py.exists()
            and json.loads(marker.read_text()).get("packages") == list(tool.packages)):
        print(f"installing {', '.join(tool.packages)} into {home / 'venv'} ...", flush=True)
        _install(tool, home, py)
        versions = _versions(py, dists)
        if (versions["torch"] or "").split("+")[0] != TORCH:
            raise RuntimeError(f"{home}: torch {versions['torch']} was installed, not {TORCH}")
        marker.write_text(json.dumps({"packages": list(tool.packages), "versions": versions}))
    return str(py), json.loads(marker.read_text())["versions"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- workers

def _env(threads: int | None, main_venv: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not main_venv:
        for k in ("PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(k, None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _last_json(path: Path) -> dict | None:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip().split("\r")[-1]
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _wait(p: subprocess.Popen, timeout: float | None) -> tuple[int, bool]:
    """(the worker's exit status, whether it was killed for running past `timeout` s)."""
    try:
        return p.wait(timeout), False
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(), True


def run_worker(py: str, tool: Tool, job: dict, logs: Path, a) -> dict:
    """The worker's result line, or {"error": ...}."""
    cmd = [py, str(PEERS / tool.worker), job["model_dir"], job["calib"], str(job["bits"]),
           str(job["group"]), job["out"], "--options", json.dumps(job["options"])]
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=logs.parent,   # stray files: logs
                             env=_env(a.threads, tool.venv is None))
        rc, late = _wait(p, a.timeout or None)
    info = _last_json(out) or {}
    if rc and "error" not in info:
        tail = [l for l in err.read_text(errors="replace").splitlines() if l.strip()][-1:] or [""]
        why = f"killed after --timeout {a.timeout:g}s" if late else f"exit {rc}"
        info = {"error": f"{why}: {tail[0][:300]}"}
    if "error" in info:
        info["log"] = str(err)
    return info


# ---------------------------------------------------------------- evaluation

def load_dense(path: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def max_levels(model, group: int) -> int:
    """The most distinct values in any run of `group` consecutive weights of a block linear."""
    worst = 0
    for name, m in model.named_modules():
        if name.startswith(BLOCK_PREFIX) and isinstance(m, torch.nn.Linear):
            s = m.weight.reshape(-1, group).sort(dim=1).values
            worst = max(worst, int(((s[:, 1:] != s[:, :-1]).sum(1) + 1).max()))
    return worst


def score(path: str, tok, ids: dict, windows: int, fp32: dict, group: int) -> tuple[dict, int]:
    """({domain: {ppl, ratio}}, levels_max) of the checkpoint at `path`."""
    model = load_dense(path)
    levels = max_levels(model, group)
    res = evaluate(model, tok, ids, windows=windows)
    del model
    return {d: {"ppl": r["ppl"], "ratio": r["ppl"] / fp32[d]["ppl"]} for d, r in res.items()}, levels


def fp32_baseline(model_dir: str, tok, ids: dict, a, results: dict) -> dict:
    """Results with the fp32 model's row on these windows (computed once per window count)."""
    key = f"fp32 w{a.max_windows}"
    if key in results:
        return results
    return write_row(Path(a.out), results, key, evaluate(load_dense(model_dir), tok, ids,
                                                         windows=a.max_windows))


def calib_file(tok, fold: str, n: int, tmp: Path) -> str:
    from quantkit.calib.text import calibration_batches
    path = tmp / f"calib-{fold}-n{n}.pt"
    if not path.exists():
        tokens = torch.cat(calibration_batches(tok, fold, n_samples=n, seqlen=SEQLEN, seed=0,
                                               batch_size=8))
        torch.save(tokens, path)
    return str(path)


# ---------------------------------------------------------------- rows

def run_options(name: str, tool: Tool, fold: str | None, a, overrides: dict) -> dict:
    opts = dict(tool.options)
    if tool.worker == "quantkit_worker.py":
        extra = {"calib.dataset": fold, "calib.n_samples": a.n_samples} if fold else {}
        opts["overrides"] = {**opts.get("overrides", {}), **overrides, **extra}
    return opts


def one_run(name, tool, py, fold, bits, group, ctx, overrides) -> dict:
    """Quantize once (calibrated on `fold`, or data-free) and score the domains it may see."""
    a, tok, ids, fp32 = ctx["args"], ctx["tok"], ctx["ids"], ctx["fp32"]
    tag = f"{name.replace(':', '-')}-w{bits}g{group}-{fold or 'nocalib'}"
    out = ctx["tmp"] / tag
    job = {"model_dir": ctx["model_dir"], "bits": bits, "group": group, "out": str(out),
           "calib": calib_file(tok, fold, a.n_samples, ctx["tmp"]) if fold else "-",
           "options": run_options(name, tool, fold, a, overrides)}
    print(f"  {name} w{bits}g{group} {fold or '(no calibration)'}: quantizing ...", flush=True)
    info = run_worker(py, tool, job, ctx["logs"] / tag, a)
    if "error" in info:
        return info
    target = {d: ids[d] for d in (fold_domains(other_fold(fold)) if fold else ids)}
    try:
        info["domains"], info["levels_max"] = score(str(out), tok, target, a.max_windows, fp32, group)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    info["geomean"] = geomean(v["ratio"] for v in info["domains"].values())
    print(f"  {name} w{bits}g{group} {fold or '-'}: x{info['geomean']:.4f} "
          f"({info['quant_seconds']:.0f}s, {info['peak_rss_mb']:.0f} MiB, "
          f"{info['levels_max']} levels)", flush=True)
    return info


ROW_LEVEL = ("domains", "settings", "bpw_formula", "version", "versions", "bits_per_weight")


def build_row(name, tool, bits, group, versions, runs: dict, a, overrides) -> dict:
    row = {"tool": name, "bits": bits, "group_size": group,
           "windows": a.max_windows, "versions": versions,
           "calibration": "fold-a / fold-b, each scored on the other fold" if tool.calibrated
           else "none (scored on all six domains)"}
    if tool.calibrated:
        row["n_samples"] = a.n_samples
    if tool.worker == "quantkit_worker.py":
        row["recipe_overrides"] = run_options(name, tool, None, a, overrides)["overrides"]
    ok = {f: r for f, r in runs.items() if "error" not in r}
    first = next(iter(ok.values()), {})
    for k in ("version", "bits_per_weight", "bpw_formula", "settings"):
        if k in first:
            row[k] = first[k]
    row["domains"] = {d: {**v, "calib": f} for f, r in ok.items() for d, v in r["domains"].items()}
    row["runs"] = {f: {k: v for k, v in r.items() if k not in ROW_LEVEL} for f, r in runs.items()}
    if ok:
        row["quant_seconds"] = sum(r["quant_seconds"] for r in ok.values()) / len(ok)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok.values())
        row["levels_max"] = max(r["levels_max"] for r in ok.values())
    errors = {f: r["error"] for f, r in runs.items() if "error" in r}
    if errors:
        row["error"] = "; ".join(f"{f}: {e}" for f, e in errors.items())
    elif len(row["domains"]) == len(FOLDS) * 3:
        row["ood_geomean"] = geomean(v["ratio"] for v in row["domains"].values())
    return row


def tool_row(name: str, bits: int, group: int, ctx: dict, overrides: dict) -> dict:
    tool, a = TOOLS[name.split(":")[0]], ctx["args"]
    if bits not in tool.bits:
        return {"tool": name, "bits": bits, "group_size": group,
                "skipped": NOT_SUPPORTED.get(name, f"{name} has no {bits}-bit setting")}
    try:
        py, versions = ensure_venv(tool)
    except Exception as e:  # noqa: BLE001  (a tool that will not install still gets its row)
        return {"tool": name, "bits": bits, "group_size": group,
                "error": f"install: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    runs = {}
    for fold in (FOLDS if tool.calibrated else (None,)):
        try:
            runs[fold or "none"] = one_run(name, tool, py, fold, bits, group, ctx, overrides)
        except Exception as e:  # noqa: BLE001  (e.g. a checkpoint that does not load)
            runs[fold or "none"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return build_row(name, tool, bits, group, versions, runs, a, overrides)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Peer quantization tools against quantkit on "
                                 "SmolLM2-135M, out of domain (see the module docstring).")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)}")
    ap.add_argument("--configs", default="4:64,3:64", help="BITS:GROUP,... (e.g. 4:64,3:64)")
    ap.add_argument("--n-samples", type=int, default=128, help="calibration windows of 512 tokens")
    ap.add_argument("--max-windows", type=int, default=WINDOWS, help="eval windows per domain")
    ap.add_argument("--set", action="append", default=[], help="quantkit override KEY=VALUE (YAML)")
    ap.add_argument("--quantkit-variant", action="append", default=[],
                    help="NAME:KEY=VALUE,KEY=VALUE (no commas inside values): one more quantkit "
                         "row, its overrides on top of --set; repeatable")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads of every worker and eval")
    ap.add_argument("--timeout", type=float, default=0, help="seconds before a worker is killed (0: none)")
    ap.add_argument("--out", default=str(default_path(__file__)))
    a = ap.parse_args(argv)
    a.configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",") if c]
    unknown = [t for t in a.tools.split(",") if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    return a


def variants(a) -> list[tuple[str, dict]]:
    """(row name, quantkit overrides) for the base quantkit row and each --quantkit-variant."""
    base = parse_sets(a.set)
    out = [("quantkit", base)]
    for v in a.quantkit_variant:
        name, _, sets = v.partition(":")
        out.append((f"quantkit:{name}", {**base, **parse_sets([s for s in sets.split(",") if s])}))
    return out


def rows_to_run(a) -> list[tuple[str, dict]]:
    todo = []
    for t in a.tools.split(","):
        todo += variants(a) if t == "quantkit" else [(t, {})]
    return todo


def print_table(rows: dict) -> None:
    print(f"\n{'row':34} {'bpw':>7} {'ood x':>8} {'quant s':>8} {'RSS MiB':>8} {'levels':>6}  note")
    for key, r in rows.items():
        note = r.get("skipped") or r.get("error") or ""
        print(f"{key:34} {r.get('bits_per_weight', float('nan')):7.3f} "
              f"{r.get('ood_geomean', float('nan')):8.4f} {r.get('quant_seconds', float('nan')):8.1f} "
              f"{r.get('peak_rss_mb', float('nan')):8.0f} {r.get('levels_max', '-'):>6}  {note[:80]}")


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    from quantkit.model.loader import resolve_source
    model_dir = resolve_source("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    path = Path(a.out)
    results = load_rows(path)
    ids = eval_ids(tok, "mix")
    results = fp32_baseline(model_dir, tok, ids, a, results)
    fp32 = results[f"fp32 w{a.max_windows}"]
    (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE / "tmp"))
    logs = CACHE / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    ctx = {"args": a, "tok": tok, "ids": ids, "fp32": fp32, "model_dir": model_dir,
           "tmp": tmp, "logs": logs}
    print(f"fp32 on {a.max_windows} windows per domain; worker logs in {logs}", flush=True)
    done = {}
    try:
        for name, overrides in rows_to_run(a):
            for bits, group in a.configs:
                key = f"{name} w{bits}g{group}"
                done[key] = tool_row(name, bits, group, ctx, overrides)
                results = write_row(path, results, key, done[key])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(done)


if __name__ == "__main__":
    main()
