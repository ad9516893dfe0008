"""The independent work of a run as Ray tasks (`--executor ray`), on a cluster or on a Ray
instance started for the run.

- What several work items share (the float model, the calibration tensor, the prepared model)
  goes into the object store once; each task gets references, not copies in its arguments.
- Each task runs with the driver's torch thread count and seeds itself from the run's seed (the
  work items carry it), so its numbers are the local run's, bit for bit, on CPU.
- A task whose worker dies is retried (`max_retries`); on a dead node, Ray reschedules it.
- A task asks for one CPU, or one GPU with `--device cuda`, and a memory estimate (its items'
  tensors twice over plus a fixed allowance), so that Ray packs tasks onto nodes that hold them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from typing import Callable, Iterator

import torch

from .errors import Sub8Error
from .executor import Executor

MAX_RETRIES = 3
OVERHEAD_BYTES = 512 * 2 ** 20  # a worker's own memory on top of its item's tensors


def _ray():
    try:
        import ray
    except ImportError:
        raise Sub8Error("--executor ray needs Ray: pip install 'sub8[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One clear error, before any work, when HOST:PORT does not answer."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise Sub8Error(f"--ray-address expects auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise Sub8Error(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


class _Shared:
    """A reference to an object-store copy of a work item's field (resolved in the task)."""

    def __init__(self, ref):
        self.ref = ref


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in list(value.parameters()) + list(value.buffers()))
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def memory_estimate(item) -> int:
    """Bytes a task needs: its item's tensors (model, data, states) twice (the copy it works on
    and what it builds from it) and a fixed allowance."""
    fields = [getattr(item, f.name) for f in dataclasses.fields(item)] if dataclasses.is_dataclass(item) else [item]
    return 2 * sum(_tensor_bytes(v) for v in fields) + OVERHEAD_BYTES


def _run_task(fn: Callable, item, threads: int):
    """In the worker: resolve the shared fields, run, and say where and how long."""
    ray = _ray()
    if dataclasses.is_dataclass(item):
        resolved = {f.name: ray.get(getattr(item, f.name).ref) for f in dataclasses.fields(item)
                    if isinstance(getattr(item, f.name), _Shared)}
        item = dataclasses.replace(item, **resolved)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = fn(item)
    return result, ray.get_runtime_context().get_node_id(), time.perf_counter() - start


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, address: str | None = None, device: str = "cpu", max_retries: int = MAX_RETRIES):
        """`address`: None starts a Ray instance on this machine for the run; "auto" joins the one
        `ray start` runs here; HOST:PORT joins that cluster's head."""
        super().__init__()
        ray = _ray()
        if address not in (None, "auto"):
            check_reachable(address)
        self.address, self.gpu, self.max_retries = address, device.startswith("cuda"), max_retries
        if not ray.is_initialized():
            # Workers import what the driver imports (python:module:fn models included).
            env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": env})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise Sub8Error(f"cannot reach the Ray cluster at {address or 'a new local instance'}: "
                                f"{str(exc).splitlines()[0]}") from None
        self._task = ray.remote(_run_task)
        self.slots = max(1, int(ray.cluster_resources().get("GPU" if self.gpu else "CPU", 1)))

    def _share(self, items: list) -> list:
        """Items whose fields that several items hold (the same object) point into the object
        store, each put once."""
        ray = _ray()
        if not items or not all(dataclasses.is_dataclass(i) for i in items):
            return items
        seen: dict[int, int] = {}
        for item in items:
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                if _tensor_bytes(value):
                    seen[id(value)] = seen.get(id(value), 0) + 1
        refs = {}
        shared = []
        for item in items:
            changes = {}
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                if seen.get(id(value), 0) > 1:
                    if id(value) not in refs:
                        refs[id(value)] = _Shared(ray.put(value))
                    changes[f.name] = refs[id(value)]
            shared.append(dataclasses.replace(item, **changes) if changes else item)
        return shared

    def _results(self, fn: Callable, items: list) -> Iterator[tuple[object, str, float]]:
        ray = _ray()
        threads = torch.get_num_threads()
        refs = []
        for item, sent in zip(items, self._share(items)):
            options = {"num_cpus": 0 if self.gpu else 1, "num_gpus": 1 if self.gpu else 0,
                       "memory": memory_estimate(item), "max_retries": self.max_retries}
            refs.append(self._task.options(**options).remote(fn, sent, threads))
        return self._gather(ray, refs)

    @staticmethod
    def _gather(ray, refs) -> Iterator[tuple[object, str, float]]:
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the task's own error: raise it as itself
                raise exc.as_instanceof_cause() from None
