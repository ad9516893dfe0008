"""What a run is doing, on stderr: the stage it is in, and a bar for every stage that can take
more than a few seconds (stage name, count, rate). SUB8_PROGRESS=0 silences both."""

from __future__ import annotations

import contextlib
import os
import sys

_lines = [True]  # stage lines on; a caller that prints its own (the demo's table) turns them off


def enabled() -> bool:
    return os.environ.get("SUB8_PROGRESS", "1") != "0"


def say(text: str) -> None:
    """One line about the run's stage."""
    if enabled() and _lines[-1]:
        print(f"sub8: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def without_stage_lines():
    """Bars only: for callers whose own output says which stage runs."""
    _lines.append(False)
    try:
        yield
    finally:
        _lines.pop()


def bar(total: int, desc: str | None, unit: str = "batch"):
    """A progress bar (tqdm) on stderr that disappears when done; update(n) as work finishes.
    `desc=None` (a caller asked for no bar) gives a silent one with the same interface."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, file=sys.stderr,
                disable=desc is None or not enabled())
