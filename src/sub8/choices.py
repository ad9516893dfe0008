"""What a user types that is checked without torch: bit-widths, pipeline names, range methods
and output losses. The CLI validates arguments with these before it imports torch or a model,
and the modules that act on them take their names from here."""

from __future__ import annotations

from .errors import Sub8Error

# Bit-widths that mean "leave this tensor in float".
FLOAT_BITS = (16, 32)
PIPELINE_NAMES = ("auto", "rtn", "adaquant", "light", "advanced")
RANGE_METHODS = ("auto", "minmax", "percentile", "mse")
OUTPUT_LOSSES = ("kl", "mse")  # label-free losses of quantized vs float outputs


def parse_bits(value) -> int | None:
    """Bits 2..8 as an int; "float", 16 or 32 mean "leave in float" (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("float", "fp", "fp32", "none"):
            return None
        try:
            value = int(text)
        except ValueError:
            raise Sub8Error(f"bits must be an integer 2..8 or 'float', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Sub8Error(f"bits must be an integer 2..8 or 'float', got {value!r}")
    if value in FLOAT_BITS:
        return None
    if not 2 <= value <= 8:
        raise Sub8Error(f"bits must be in 2..8 (or 16/32/'float' for no quantization), got {value}")
    return value
