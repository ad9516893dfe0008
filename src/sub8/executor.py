"""Where the independent work of a run is done.

A run's parallel loops (each candidate precision's recipe before bit allocation, the
sensitivity table's precisions, parallel AdaQuant's memory groups, the Pareto front's points)
are top-level functions over picklable work items, mapped by an executor. The in-process
executor runs them one after another in this process, lazily and in order: exactly the work
and the numbers of a plain loop. An executor for another place (processes, a cluster) only
has to provide `map` with the same contract: results in the order of the items.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator


class Executor:
    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """fn(item) for each item, in order (an iterator: the caller may act on each result as it
        arrives, e.g. checkpoint it)."""
        raise NotImplementedError


class InProcessExecutor(Executor):
    def map(self, fn: Callable, items: Iterable) -> Iterator:
        return map(fn, items)


def default_executor() -> Executor:
    return InProcessExecutor()
