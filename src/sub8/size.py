"""Weight memory of a prepared model, as a file would store it."""

from __future__ import annotations

from .prepare import PreparedModel
from .quant.layers import QuantLayer

STEP_BITS = 32      # each per-channel step is a float32
ZERO_POINT_BITS = 8  # each zero point fits the integer grid (<= 8 bits)
FLOAT_BITS = 32


def layer_weight_bits(layer: QuantLayer) -> int:
    """One layer's stored size: weight at its bit-width (float32 when not quantized), bias in
    float32, and every enabled quantizer's steps and zero points."""
    total = 0
    for q in (layer.weight_quantizer, layer.input_quantizer):
        if q.enabled:
            total += q.step.numel() * (STEP_BITS + (0 if q.symmetric else ZERO_POINT_BITS))
    w = layer.layer.weight
    total += w.numel() * (layer.w_bits or FLOAT_BITS)
    if layer.layer.bias is not None:
        total += layer.layer.bias.numel() * FLOAT_BITS
    return total


def weight_bits(prepared: PreparedModel) -> int:
    """Every quantized layer at its bit-width plus every other parameter at 32 bits."""
    layers = prepared.quant_layers().values()
    counted = {id(p) for layer in layers for p in layer.parameters()}
    return (sum(layer_weight_bits(layer) for layer in layers)
            + sum(p.numel() * FLOAT_BITS for p in prepared.module.parameters() if id(p) not in counted))


def size_report(prepared: PreparedModel) -> dict:
    bits = weight_bits(prepared)
    float_bits = prepared.float_params * FLOAT_BITS
    return {"weight_bits": bits, "float_bits": float_bits, "ratio": bits / float_bits}
