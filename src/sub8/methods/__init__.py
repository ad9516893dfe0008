"""The built-in methods, one module each; importing this package registers them (registry.py)."""

from . import ranges, smooth_quant, equalize, bias_correction, adaquant, gptq, allocate, bn_tuning, bias_tuning  # noqa: F401
