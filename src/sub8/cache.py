"""A disk cache for expensive intermediate results, keyed by what produced them.

A key is a hash of everything the result depends on (the float model's tensors, the calibration
data, the settings), so a changed model, data set or setting never reads a stale entry.
Entries are written atomically and read with `weights_only=True`; an unreadable entry is
recomputed, not trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings

import torch

from .atomic import write_bytes_atomic


def default_cache_dir() -> str:
    """$SUB8_CACHE_DIR, else $XDG_CACHE_HOME/sub8, else ~/.cache/sub8."""
    if os.environ.get("SUB8_CACHE_DIR"):
        return os.environ["SUB8_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sub8")


def tensor_digest(tensors) -> str:
    """sha256 of tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(*parts) -> str:
    """A short key from JSON-able parts and digests."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DiskCache:
    """`get`/`put` of tensors and plain containers under `folder`; `folder=None` caches nothing;
    `read=False` writes entries but never reads one (a fresh run)."""

    def __init__(self, folder: str | None, read: bool = True):
        self.folder = folder
        self.read = read
        self.hits: list[str] = []
        self.misses: list[str] = []

    def _path(self, kind: str, key: str) -> str:
        return os.path.join(self.folder, f"{kind}-{key}.pt")

    def get(self, kind: str, key: str):
        if self.folder is None:
            return None
        path = self._path(kind, key)
        if not self.read or not os.path.exists(path):
            self.misses.append(f"{kind}-{key}")
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: recompute
            warnings.warn(f"ignoring unreadable cache entry {path}: {type(exc).__name__}")
            self.misses.append(f"{kind}-{key}")
            return None
        self.hits.append(f"{kind}-{key}")
        return value

    def put(self, kind: str, key: str, value) -> None:
        if self.folder is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        write_bytes_atomic(self._path(kind, key), buffer.getvalue())


ENTRY = re.compile(r"^([a-z_]+)-([0-9a-f]{24})\.pt$")


def cache_entries(folder: str) -> list[dict]:
    """The entries sub8 wrote in `folder` (kind, path, bytes, mtime), oldest first; files of
    other names are not sub8's and are never listed or removed."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = ENTRY.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(path):
            st = os.stat(path)
            out.append({"kind": m.group(1), "path": path, "bytes": st.st_size, "mtime": st.st_mtime})
    return sorted(out, key=lambda e: e["mtime"])


def clear_cache(folder: str, kind: str | None = None) -> list[dict]:
    """Remove sub8's entries (of one kind, or all) from `folder`; returns what was removed."""
    removed = [e for e in cache_entries(folder) if kind is None or e["kind"] == kind]
    for e in removed:
        os.unlink(e["path"])
    return removed
