"""sub8: post-training quantization for PyTorch.

The API is loaded on first use (PEP 562), so that `sub8 --help` and argument errors answer
before torch is imported."""

import sys
import types

from ._version import __version__  # noqa: F401
from .errors import Sub8Error  # noqa: F401

# name -> the module that defines it
_API = {"QuantConfig": "config", "QuantizedModel": "prepare", "quantize": "pipeline", "prepare": "adapters",
        "calibrate_ranges": "calibrate", "load": "export", "save": "export", "RunContext": "registry",
        "register": "registry"}

__all__ = ["QuantConfig", "QuantizedModel", "RunContext", "Sub8Error", "calibrate_ranges", "load", "prepare",
           "quantize", "register", "save", "__version__"]


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the subpackage sub8.prepare binds it here, which would hide the API function
        # sub8.prepare; the subpackage stays importable by its full name.
        if name == "prepare" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _API:
        import importlib
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sub8' has no attribute {name!r}")
