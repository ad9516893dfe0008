"""report.json: step timings and peak memory, versions, and the output folder's checks."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time

import torch

from .atomic import atomic_dir, write_bytes_atomic, write_json  # noqa: F401  (re-exported)
from .errors import Sub8Error, few

TOOL = "sub8"
REPORT = "report.json"
PAGE = "report.html"  # report.json as a page (page.py)
# report.json's layout (docs/report-format.md); 1: before it carried a version.
REPORT_VERSION = 2


def _rss_peak_mb() -> float:
    """Peak resident memory since the last reset (Linux VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_rss_peak() -> None:
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class StepLog:
    """Collects one record per pipeline step: seconds and peak memory."""

    def __init__(self):
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str, device: str = "cpu"):
        _reset_rss_peak()
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        record = {"name": name}
        yield record
        if cuda:
            torch.cuda.synchronize()
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        record["seconds"] = time.perf_counter() - start
        record["peak_rss_mb"] = _rss_peak_mb()
        self.steps.append(record)


def versions() -> dict:
    import numpy
    import scipy
    import torchvision

    from ._version import __version__
    return {"sub8": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "platform": platform.platform()}


def is_sub8_run(path: str) -> bool:
    try:
        with open(os.path.join(path, REPORT)) as fh:
            return json.load(fh).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


# What a sub8 run writes into its output folder; --force replaces these and nothing else.
RUN_FILES = (REPORT, PAGE, "model.safetensors", "pareto.json", "pareto.md", "pareto.svg")


def foreign_entries(path: str) -> list[str]:
    """The entries of an output folder that no sub8 run writes."""
    return sorted(n for n in os.listdir(path) if not is_run_file(n))


def is_run_file(name: str) -> bool:
    return name in RUN_FILES


def check_output_dir(path: str, force: bool) -> list[str]:
    """Refuse a folder that holds anything but an earlier sub8 run, unless forced; returns the
    entries that a forced run keeps (it replaces only a run's own files)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise Sub8Error(f"output path {path!r} exists and is not a folder")
    if not os.path.isdir(path) or not os.listdir(path) or is_sub8_run(path):
        return []
    foreign = foreign_entries(path)
    if not force:
        raise Sub8Error(f"output folder {path!r} is not a sub8 run ({len(foreign)} other entries: "
                        f"{few(foreign, 5)}); choose another folder, or pass --force to write sub8's files "
                        f"into it (the others are kept)")
    return foreign
