"""The one exception type that sub8 raises for bad input: the CLI prints it as one line."""


class Sub8Error(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
