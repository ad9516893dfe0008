from .quantizer import Quantizer, round_ste, parse_bits
from .layers import QuantLayer, float_mode, quant_layers

__all__ = ["Quantizer", "QuantLayer", "float_mode", "quant_layers", "round_ste", "parse_bits"]
