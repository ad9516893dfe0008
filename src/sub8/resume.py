"""Resume an interrupted run: each finished step (and each finished AdaQuant group) is saved
to the disk cache under a key made of the model, the calibration data, the whole config and
the steps done so far. The same command started again loads the longest finished prefix and
goes on from there; a changed model, data set or setting makes other keys, so nothing stale
is read. A run that completes removes its checkpoints (they only serve interrupted runs).
"""

from __future__ import annotations

import os

import torch

from .cache import DiskCache, fingerprint, tensor_digest
from .quant.layers import module_state  # noqa: F401  (re-exported)


class Checkpoints:
    def __init__(self, cache: DiskCache, model: torch.nn.Module, calib: torch.Tensor, config_dict: dict):
        self.cache = cache
        config_dict = {k: v for k, v in config_dict.items() if k != "cache_dir"}
        self.run_key = fingerprint(tensor_digest(model.state_dict().values()), type(model).__qualname__,
                                   tensor_digest([calib]), config_dict)
        self.written: list[str] = []

    def key(self, *parts) -> str:
        return fingerprint(self.run_key, *parts)

    def load(self, *parts):
        key = self.key(*parts)
        value = self.cache.get("checkpoint", key)
        if value is not None:
            self.written.append(key)  # cleared with the rest when the run completes
        return value

    def save(self, value, *parts) -> None:
        if self.cache.folder is None:
            return
        key = self.key(*parts)
        self.cache.put("checkpoint", key, value)
        self.written.append(key)

    def scope(self, *parts) -> "ScopedCheckpoints":
        """Checkpoints inside one step (AdaQuant's groups)."""
        return ScopedCheckpoints(self, parts)

    def clear(self) -> None:
        for key in self.written:
            path = os.path.join(self.cache.folder, f"checkpoint-{key}.pt")
            if os.path.exists(path):
                os.unlink(path)
        self.written.clear()


class ScopedCheckpoints:
    def __init__(self, parent: Checkpoints, prefix: tuple):
        self.parent, self.prefix = parent, prefix

    def load(self, *parts):
        return self.parent.load(*self.prefix, *parts)

    def save(self, value, *parts) -> None:
        self.parent.save(value, *self.prefix, *parts)
