from .adaquant import AdaQuantConfig, adaquant
from .bias_correction import correct_bias
from .bias_tuning import tune_biases
from .bn_tuning import tune_batchnorm
from .ranges import calibrate_ranges

__all__ = ["AdaQuantConfig", "adaquant", "calibrate_ranges", "correct_bias", "tune_batchnorm", "tune_biases"]
