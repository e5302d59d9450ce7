"""Golden checkpoints: every method's packed tensors on a tiny model, byte for byte.

The refactors of the pipeline (plug-ins, one GPTQ loop, moved modules) must not change what
the project writes. tests/golden/packed.json holds, per recipe below, a SHA-256 of every tensor
of the saved model.safetensors (dtype, shape and bytes: equal digests <=> torch.equal) and of
its quantization_config's layers. The
digests were written before the refactor by

    QUANTKIT_WRITE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_golden.py

Floating-point results depend on the CPU's vector unit and on torch's and transformers' versions
(the tiny model's attention path), so the file records all three; on another the comparison is
skipped with that reason (the test
is for refactoring on one machine, not a portability claim).
"""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.pipeline import run
from quantkit.recipe import Recipe
from tests.test_cli import save_tiny_checkpoints
from tests.conftest import tiny_model

GOLDEN = Path(__file__).parent / "golden" / "packed.json"
CALIB = {"calib.n_samples": 8, "calib.seqlen": 32, "calib.batch_size": 4}
RECIPES = {
    "rtn": dict(method="rtn", bits=4, group_size=32),
    "gptq": dict(method="gptq", bits=4, group_size=32, act_order=True, static_groups=True,
                 fp_target=True),
    "gptq-baq": dict(method="gptq-baq", bits=3, group_size=32),
    "rsq": dict(method="rsq", bits=3, group_size=32),
    "nupes": dict(method="nupes", bits=4, group_size=32),
    "llm-int8": dict(method="llm-int8", bits=8, **{"llm_int8.threshold": 1.0}),
    "sparsegpt": dict(prune="sparsegpt", bits=4, group_size=32),
    "armor": dict(prune="armor", bits=16, **{"armor.iters": 20, "armor.block_size": 16}),
    "ip": dict(method="gptq", alloc="ip", bits=3.5, group_size=32, sensitivity="fisher",
               **{"calib.table_samples": 4}),
}


def machine() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability()}


def digests(out_dir: Path) -> dict[str, str]:
    """Per tensor of the checkpoint, and for the manifest's layers (formats, widths)."""
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]["layers"]
    out = {"config.json:quantization_config.layers":
           hashlib.sha256(json.dumps(qc, sort_keys=True).encode()).hexdigest()}
    for name, t in sorted(load_file(out_dir / "model.safetensors").items()):
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[name] = h.hexdigest()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    save_tiny_checkpoints(d, {"llama": tiny_model("llama")})
    return d


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("QUANTKIT_WRITE_GOLDEN"):
        return None
    data = json.loads(GOLDEN.read_text())
    if data["machine"] != machine():
        pytest.skip(f"golden digests were written on {data['machine']}, this is {machine()}")
    return data


@pytest.mark.parametrize("name", list(RECIPES))
def test_packed_tensors_match_the_golden_digests(name, model_dir, golden, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # reduction order fixed: results are bit-exact
    try:
        recipe = Recipe(model=str(model_dir / "llama")).with_overrides(
            **RECIPES[name], **CALIB, **{"calib.dataset": str(model_dir / "text.txt")},
            out=str(tmp_path / name))
        run(recipe, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = digests(tmp_path / name)
    if golden is None:
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"recipes": {}}
        data["machine"] = machine()
        data["recipes"][name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    want = golden["recipes"][name]
    assert got.keys() == want.keys()
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"{name}: {len(changed)} tensors differ from the golden ones, e.g. {changed[:3]}"
