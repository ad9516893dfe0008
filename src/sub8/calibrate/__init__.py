from .adaquant import AdaQuantConfig, adaquant
from .bias_correction import correct_bias
from .ranges import calibrate_ranges

__all__ = ["AdaQuantConfig", "adaquant", "calibrate_ranges", "correct_bias"]
