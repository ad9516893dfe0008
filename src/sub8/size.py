"""Weight memory of a prepared model, as a file would store it."""

from __future__ import annotations

from .prepare import PreparedModel

STEP_BITS = 32      # each per-channel step is a float32
ZERO_POINT_BITS = 8  # each zero point fits the integer grid (<= 8 bits)


def weight_bits(prepared: PreparedModel) -> int:
    """Quantized weights at their bit-width plus their steps and zero points; every other
    parameter (biases, float layers, unfolded norms) at 32 bits."""
    quantized = set()
    total = 0
    for layer in prepared.quant_layers().values():
        for q, tensor in ((layer.weight_quantizer, layer.layer.weight), (layer.input_quantizer, None)):
            quantized.update(id(p) for p in (q.step, q.zero_point))
            if not q.enabled:
                continue
            total += q.step.numel() * (STEP_BITS + (0 if q.symmetric else ZERO_POINT_BITS))
            if tensor is not None:
                total += tensor.numel() * q.bits
                quantized.add(id(tensor))
    for p in prepared.module.parameters():
        if id(p) not in quantized:
            total += p.numel() * 32
    return total


def size_report(prepared: PreparedModel) -> dict:
    bits = weight_bits(prepared)
    float_bits = prepared.float_params * 32
    return {"weight_bits": bits, "float_bits": float_bits, "ratio": bits / float_bits}
