"""The one exception type that sub8 raises for bad input: the CLI prints it as one line."""


class Sub8Error(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def few(names, n: int = 3) -> str:
    """The first `n` of `names` (sorted) and how many more: a message stays one short line."""
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
