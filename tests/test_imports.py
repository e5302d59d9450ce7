"""Imports run one way: down the layers of DESIGN.md, never up, never in a cycle (read by ast)."""
import ast
from pathlib import Path

import quantkit

PACKAGE = Path(quantkit.__file__).parent
# Lowest first; a module may import modules of its own layer or of a lower one (longest prefix
# wins). The same table is in DESIGN.md ("Import layers").
LAYERS = [
    ["errors", "types", "version", "registry", "recipe"],
    ["formats.packing"],
    ["formats.packed"],
    ["formats.llm_int8", "formats.lut", "formats.sparse"],
    ["formats.io", "formats", "resume"],
    ["kernels.reference", "kernels.cpu", "kernels.triton", "kernels.llm_int8", "kernels.int8_act"],
    ["kernels.lut", "kernels.sparse"],
    ["kernels"],
    ["model.discovery", "model.zoo", "model.stream", "model.runner", "model.convnet"],
    ["model.loader", "model"],
    ["quant.grid", "quant.levels", "quant.rotation", "quant.act", "alloc.table"],
    ["stats"],
    ["quant", "prune"],
    ["alloc"],
    ["calib"],
    ["nn.qlinear"],
    ["serve"],
    ["nn.hf", "nn", "formats.export"],
    ["report", "evaluate", "benchmark"],
    ["image"],
    ["image_run"],
    ["pipeline"],
    [""],                                   # quantkit/__init__.py: the public API
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    p = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """quantkit modules `path` imports (names relative to the package; "" is quantkit itself).
    `from quantkit.x import y` counts as quantkit.x.y when y is a module, else as quantkit.x."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quantkit":
            base = node.module[len("quantkit."):] if "." in node.module else ""
            for a in node.names:
                sub = f"{base}.{a.name}".lstrip(".")
                out.add(sub if is_module(sub) else base)
        elif isinstance(node, ast.Import):
            out |= {a.name[len("quantkit."):] if "." in a.name else "" for a in node.names
                    if a.name.split(".")[0] == "quantkit"}
    return out


def rank(name: str) -> int:
    best, level = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, level = len(prefix), i
    return level


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_every_import_runs_down_the_layers():
    up = [f"{m} (layer {rank(m)}) imports {d} (layer {rank(d)})"
          for m, deps in sorted(graph().items()) for d in sorted(deps) if rank(d) > rank(m)]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The walk itself: a planted upward import and a planted cycle are found."""
    assert rank("formats.packed") < rank("quant.gptq") < rank("pipeline") < rank("")
    assert "stats.hessian" in imports(PACKAGE / "quant" / "base.py")
    assert "formats.sparse" in imports(PACKAGE / "prune" / "mask.py")
    fake = dict(graph())
    fake["formats.packed"] = fake["formats.packed"] | {"formats.sparse"}
    monkeypatch.setattr("tests.test_imports.graph", lambda: fake)
    fails_with(test_no_import_cycles, "formats.packed -> formats.sparse -> formats.packed")
    fake["types"] = {"pipeline"}
    fails_with(test_every_import_runs_down_the_layers, "types (layer 0) imports pipeline")


def fails_with(check, text: str) -> None:
    try:
        check()
    except AssertionError as e:
        assert text in str(e)
    else:
        raise AssertionError(f"{check.__name__} did not fail on a planted {text!r}")


def test_every_entry_point_imports_first_in_a_fresh_interpreter():
    """Cycles through evals/ (quantkit -> evals.data -> quantkit) show only in a fresh process,
    depending on which module comes first: bench scripts start from evals, users from quantkit."""
    import subprocess
    import sys
    root = PACKAGE.parent
    for first in ("evals.data", "evals.suite", "quantkit", "quantkit.pipeline", "cli"):
        r = subprocess.run([sys.executable, "-c", f"import {first}"], cwd=root, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"import {first}: {r.stderr.strip().splitlines()[-1]}"
