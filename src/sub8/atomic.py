"""Atomic output: a file or a folder appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str, mode: int) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain open()/mkdir() would: the
    user's umask decides who may read the output, as for any other tool."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_dir(path: str, keep=lambda name: False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.
    On failure it is removed and `path` is left as it was. The entries of an existing `path`
    for which `keep(name)` is true (files another tool wrote there) move into the new folder,
    unless it has an entry of that name."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    _as_created(tmp, 0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        for name in os.listdir(path):
            if keep(name) and not os.path.lexists(os.path.join(tmp, name)):
                os.rename(os.path.join(path, name), os.path.join(tmp, name))
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
        _as_created(tmp, 0o666)
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
