"""report.json: step timings and peak memory, versions, and atomic output folders."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time

import torch

from .errors import Sub8Error

TOOL = "sub8"
REPORT = "report.json"


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

    from . import __version__
    return {"sub8": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "platform": platform.platform()}


def is_sub8_run(path: str) -> bool:
    try:
        with open(os.path.join(path, REPORT)) as fh:
            return json.load(fh).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(path: str, force: bool) -> None:
    """Refuse a folder that holds anything but an earlier sub8 run, unless forced."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise Sub8Error(f"output path {path!r} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path) and not is_sub8_run(path) and not force:
        raise Sub8Error(f"output folder {path!r} holds files that are not a sub8 run; "
                        f"choose another folder or pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.
    On failure it is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rename(path, os.path.join(old, "run"))
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a file atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
