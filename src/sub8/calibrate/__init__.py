from .bias_correction import correct_bias
from .ranges import calibrate_ranges

__all__ = ["calibrate_ranges", "correct_bias"]
