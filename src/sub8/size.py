"""Weight memory of a prepared model, as a file would store it."""

from __future__ import annotations

from torch import nn

from .prepare import PreparedModel
from .quant.embedding import QuantEmbedding
from .quant.layers import QuantInput, QuantLayer
from .quant.quantizer import Quantizer

STEP_BITS = 32      # each per-channel step is a float32
ZERO_POINT_BITS = 8  # each zero point fits the integer grid (<= 8 bits)
FLOAT_BITS = 32


def quantizer_bits(q: Quantizer) -> int:
    """A quantizer's stored steps and zero points (nothing when it is off)."""
    return q.step.numel() * (STEP_BITS + (0 if q.symmetric else ZERO_POINT_BITS)) if q.enabled else 0


def layer_weight_bits(layer: QuantLayer | QuantEmbedding | QuantInput) -> int:
    """One quantized module's stored size: its weight at its bit-width (float32 when not
    quantized), its bias and its input smoothing in float32, and every enabled quantizer's steps
    and zero points."""
    total = sum(quantizer_bits(q) for q in layer.children() if isinstance(q, Quantizer))
    if isinstance(layer, QuantInput):
        return total
    total += layer.layer.weight.numel() * (layer.w_bits or FLOAT_BITS)
    if getattr(layer.layer, "bias", None) is not None:
        total += layer.layer.bias.numel() * FLOAT_BITS
    if getattr(layer, "smooth", None) is not None:
        total += layer.smooth.numel() * FLOAT_BITS
    return total


def quantized_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (QuantLayer, QuantEmbedding, QuantInput))]


def weight_bits(prepared: PreparedModel) -> int:
    """Every quantized module as it is stored plus every other parameter at 32 bits."""
    modules = quantized_modules(prepared.module)
    counted = {id(p) for m in modules for p in m.parameters()}
    return (sum(layer_weight_bits(m) for m in modules)
            + sum(p.numel() * FLOAT_BITS for p in prepared.module.parameters() if id(p) not in counted))


def size_report(prepared: PreparedModel) -> dict:
    bits = weight_bits(prepared)
    float_bits = prepared.float_params * FLOAT_BITS
    return {"weight_bits": bits, "float_bits": float_bits, "ratio": bits / float_bits}
