"""bench/results_io.py: the one envelope of every bench result file."""
import json
import sys
from pathlib import Path

from bench.results_io import RESULTS, default_path, load_rows, save_rows


def test_rows_round_trip_merge_and_record_where_they_came_from(tmp_path):
    p = tmp_path / "x.json"
    assert load_rows(p) == {}
    save_rows(p, {"a": {"ppl": 1.5}}, "bench/x.py")
    save_rows(p, {"b": {"ppl": 2.0}}, "bench/x.py")              # merged with what the file holds
    data = json.loads(p.read_text())
    assert data["rows"] == {"a": {"ppl": 1.5}, "b": {"ppl": 2.0}} == load_rows(p)
    env = data["envelope"]
    assert env["script"] == "bench/x.py" and env["command"] == " ".join(sys.argv)
    assert env["machine"]["cores"] > 0 and env["versions"]["python"].count(".") == 2
    assert len(env["git_commit"] or "0" * 40) == 40
    save_rows(p, {"c": 3}, "bench/x.py", merge=False)
    assert load_rows(p) == {"c": 3}
    p.write_text(json.dumps({"legacy": {"ppl": 9}}))              # a file from before the envelope
    assert load_rows(p) == {"legacy": {"ppl": 9}}


def test_every_bench_script_writes_its_own_results_file():
    assert default_path("bench/ood_quality.py") == RESULTS / "ood_quality.json"
    bench = Path(__file__).parent.parent / "bench"
    assert not list(bench.glob("*.json")), "results live in bench/results/ only"
    for f in RESULTS.glob("*.json"):
        data = json.loads(f.read_text())
        assert set(data) == {"envelope", "rows"}, f.name
        script = data["envelope"]["script"]
        assert script == "cli.py" or (bench.parent / script).is_file(), (f.name, script)


def test_no_bench_script_shadows_an_installed_module():
    """`python bench/X.py` puts bench/ first on sys.path: a script named like a module that a
    dependency imports (bench/kernels.py hid the `kernels` package transformers probes for)
    breaks every bench script, so import the model stack the way a script sees it."""
    import importlib.util
    import subprocess
    bench = Path(__file__).parent.parent / "bench"
    assert [f.name for f in bench.glob("*.py") if importlib.util.find_spec(f.stem)] == []
    probe = "import transformers.activations, transformers.models.llama.modeling_llama, quantkit.pipeline"
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(bench)!r}); {probe}"],
                       capture_output=True, text=True, cwd=bench.parent)
    assert r.returncode == 0, r.stderr[-2000:]
