"""sub8: post-training quantization for PyTorch."""

__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .errors import Sub8Error  # noqa: E402
from .pipeline import QuantizedModel, quantize  # noqa: E402
from .prepare import prepare  # noqa: E402
from .calibrate import calibrate_ranges  # noqa: E402
from .export import load, save  # noqa: E402

__all__ = ["QuantConfig", "QuantizedModel", "Sub8Error", "calibrate_ranges", "load", "prepare",
           "quantize", "save", "__version__"]
