"""sub8: post-training quantization for PyTorch."""

from ._version import __version__  # noqa: F401

from .config import QuantConfig  # noqa: E402
from .errors import Sub8Error  # noqa: E402
from .prepare import QuantizedModel  # noqa: E402
from .pipeline import quantize  # noqa: E402
from .adapters import prepare  # noqa: E402
from .calibrate import calibrate_ranges  # noqa: E402
from .export import load, save  # noqa: E402
from .registry import RunContext, register  # noqa: E402

__all__ = ["QuantConfig", "QuantizedModel", "RunContext", "Sub8Error", "calibrate_ranges", "load", "prepare",
           "quantize", "register", "save", "__version__"]
