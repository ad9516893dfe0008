"""Where the independent work of a run is done.

A run's parallel loops (each candidate precision's recipe before bit allocation, the
sensitivity table's cells, parallel AdaQuant's memory groups, the Pareto front's points)
are top-level functions over picklable work items, mapped by an executor. The in-process
executor runs them one after another in this process, lazily and in order: exactly the work
and the numbers of a plain loop. An executor for another place (a Ray cluster: ray_executor.py)
only has to provide `_results` with the same contract: results in the order of the items.
Every work item seeds its own random choices from the run's seed, so where it runs does not
change what it computes.

Each map is one stage of the report's `executor` record: how many tasks, on which nodes, their
summed time and the stage's wall time.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator


class Executor:
    kind = "executor"
    slots = 1  # tasks it can run at once: callers may cut their work finer when there are more

    def __init__(self):
        self.stages: list[dict] = []

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """fn(item) for each item, in order (an iterator: the caller may act on each result as it
        arrives, e.g. checkpoint it)."""
        items = list(items)
        record = {"stage": getattr(fn, "__name__", str(fn)), "tasks": len(items), "nodes": [],
                  "task_seconds": 0.0, "wall_seconds": 0.0, "each_task_seconds": []}
        self.stages.append(record)
        return self._timed(record, self._results(fn, items), time.perf_counter())

    def _results(self, fn: Callable, items: list) -> Iterator[tuple[object, str, float]]:
        """(result, node, seconds the task took) for each item, in order."""
        raise NotImplementedError

    @staticmethod
    def _timed(record: dict, results: Iterator, start: float) -> Iterator:
        for result, node, seconds in results:
            record["task_seconds"] += seconds
            record["each_task_seconds"].append(seconds)
            if node not in record["nodes"]:
                record["nodes"].append(node)
            record["wall_seconds"] = time.perf_counter() - start
            yield result

    def summary(self, since: int = 0) -> dict:
        """report.json's `executor`: per stage (from the `since`-th on), tasks, nodes, summed task
        time, wall time, and their ratio (about the parallelism the stage got)."""
        stages = [{**s, "nodes": len(s["nodes"]),
                   "task_over_wall": s["task_seconds"] / s["wall_seconds"] if s["wall_seconds"] > 0 else None}
                  for s in self.stages[since:]]
        return {"kind": self.kind, "stages": stages}


class InProcessExecutor(Executor):
    kind = "local"

    def _results(self, fn: Callable, items: list) -> Iterator[tuple[object, str, float]]:
        for item in items:
            start = time.perf_counter()
            result = fn(item)
            yield result, "this process", time.perf_counter() - start


def default_executor() -> Executor:
    return InProcessExecutor()
