"""The one envelope every bench result file has: bench/NAME.py writes bench/results/NAME.json as

    {"envelope": {"script", "command", "git_commit", "versions", "machine", "written"},
     "rows": {...}}

`rows` is the script's own table (one entry per measured row or variant). load_rows reads it
back (and a file from before the envelope as its rows); save_rows re-reads the file first so
that rows written by a run beside this one stay, and records the command that wrote it last.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def default_path(script: str) -> Path:
    """bench/results/NAME.json for bench/NAME.py."""
    return RESULTS / f"{Path(script).stem}.json"


def envelope(script: str) -> dict:
    """Where the rows came from: command line, commit, versions, machine, time."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "quantkit"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", None)
    return {"script": f"bench/{Path(script).name}", "command": " ".join(sys.argv),
            "git_commit": commit, "versions": versions,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "threads": os.environ.get("OMP_NUM_THREADS"), "system": platform.platform()},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def load_rows(path: str | Path) -> dict:
    """The rows of a results file ({} when there is none yet)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) and "envelope" in data and "rows" in data else data


def save_rows(path: str | Path, rows: dict, script: str, merge: bool = True) -> dict:
    """Write rows under a fresh envelope (merged over the file's rows unless merge is False)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {**load_rows(path), **rows} if merge else rows
    path.write_text(json.dumps({"envelope": envelope(script), "rows": rows}, indent=2) + "\n")
    return rows
