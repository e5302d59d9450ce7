"""Outputs are whole or absent: never overwritten without overwrite=True, never half-written."""
import errno
import json

import pytest
import torch

import quantkit
import quantkit.formats.io as qio
from quantkit.errors import QuantkitError
from quantkit.formats.export import export
from quantkit.formats.io import WEIGHTS, check_output, load_tensors
from tests.conftest import tiny_model
from tests.test_cli import save_tiny_checkpoints

SMALL = {"calib.n_samples": 4, "calib.seqlen": 32, "group_size": 32}


@pytest.fixture(scope="module")
def report():
    return quantkit.quantize(tiny_model("llama"), None, bits=4, method="rtn", progress=False, **SMALL)


def siblings(d):
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def test_an_existing_output_is_replaced_only_with_overwrite(report, tmp_path):
    out = tmp_path / "q"
    report.save(out)
    first = load_tensors(out)
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(QuantkitError, match="already exists: pass --overwrite"):
        report.save(out)
    assert (out / "stale.txt").is_file()                       # untouched by the refusal
    report.save(out, overwrite=True)
    assert not (out / "stale.txt").exists()                    # replaced whole, not merged
    again = load_tensors(out)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert siblings(out) == []                                 # no tmp or old directory left


def test_a_directory_that_is_not_an_output_is_never_replaced(report, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(QuantkitError, match="not an earlier quantkit output"):
        report.save(out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    report.save(empty, overwrite=True)                         # an empty directory may be used
    assert (empty / WEIGHTS).is_file()


def test_disk_full_during_save_leaves_nothing(report, tmp_path, monkeypatch):
    out = tmp_path / "full"
    written = []

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:                            # half a file, then no space
            f.write(b"\0" * 100)
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(qio, "save_file", full)
    with pytest.raises(QuantkitError, match=r"writing .*full: disk full \(.* GiB free"):
        report.save(out)
    assert written and not out.exists() and siblings(out) == []


def test_an_earlier_output_survives_a_failed_overwrite(report, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    report.save(out)
    before = (out / WEIGHTS).read_bytes()

    def boom(*a, **k):
        raise RuntimeError("killed mid-save")
    monkeypatch.setattr(qio, "save_file", boom)
    with pytest.raises(RuntimeError):
        report.save(out, overwrite=True)
    assert (out / WEIGHTS).read_bytes() == before and siblings(out) == []


def test_an_unwritable_destination_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(QuantkitError, match="is not a writable directory"):
        check_output(blocker / "sub" / "out")
    existing = tmp_path / "done"
    existing.mkdir()
    (existing / "run.json").write_text("{}")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr("quantkit.pipeline._load", no_load)
    with pytest.raises(QuantkitError, match="already exists"):
        quantkit.quantize(tiny_model("llama"), None, method="rtn", out=str(existing), progress=False,
                          **SMALL)


def test_export_refuses_an_existing_output(report, tmp_path):
    src, out = tmp_path / "src", tmp_path / "ct"
    report.save(src)
    export(src, out, "compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    with pytest.raises(QuantkitError, match="already exists"):
        export(src, out, "compressed-tensors")
    export(src, out, "compressed-tensors", overwrite=True)     # an earlier export: replaceable
    assert json.loads((out / "config.json").read_text()) == cfg


def test_cli_refuses_to_replace_an_output_until_told(tmp_path, capsys):
    from cli import main
    save_tiny_checkpoints(tmp_path, {"llama": tiny_model("llama")})
    out = tmp_path / "q"
    argv = ["quantize", str(tmp_path / "llama"), "--method", "rtn", "--group-size", "32",
            "--n-samples", "4", "--calib-seqlen", "32", "--calib-dataset", str(tmp_path / "text.txt"),
            "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert f"{out} already exists: pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["export", str(out), "--format", "gptq", "--out", str(out)]) == 2
