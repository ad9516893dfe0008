"""Where benchmarks put what they measured: benchmarks/results/NAME.json, with the command, the
commit, the versions and the machine, so that every number on docs/benchmarks.md has its source."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sub8.report import versions, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        # ("src" of the repository, not of this folder: git resolves pathspecs from the cwd)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../src"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict:
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}


def write_result(name: str, data: dict, path: str | None = None) -> str:
    """Write benchmarks/results/NAME.json (or `path`) with the run's provenance."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {"benchmark": name, "command": "python " + " ".join(sys.argv), "commit": commit(),
                      "versions": versions(), "machine": machine(), **data})
    return path


def write_json_result(path: str, data: dict) -> str:
    """write_result named after the file (benchmarks' --json PATH)."""
    return write_result(os.path.splitext(os.path.basename(path))[0], data, path)


def kept_rows(name: str, measured: set, key) -> list[dict]:
    """The earlier benchmarks/results/NAME.json's rows whose key(row) is not in `measured`, each
    with the commit that measured it (a run that redoes some rows keeps the others)."""
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        old = json.load(fh)
    return [{"commit": old.get("commit"), **r} for r in old["rows"] if key(r) not in measured]
