"""Bias tuning: train the biases (and optionally input steps) on the float model's outputs."""

from ..calibrate.bias_tuning import BiasTuningConfig, tune_biases
from ..registry import register


@register("bias_tuning", settings=BiasTuningConfig)
def bias_tuning(ctx) -> dict:
    """Train only the biases so that the quantized outputs match the float outputs, no labels."""
    c = ctx.config
    return tune_biases(ctx.prepared, ctx.calib.to(c.device), c.bias_tuning, c.output_loss, c.forward_batch, c.seed)
