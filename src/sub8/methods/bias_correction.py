"""Empirical bias correction (Nagel et al., 2019): remove each layer's mean output shift."""

from ..calibrate.bias_correction import correct_bias
from ..registry import register


@register("bias_correction")
def bias_correction(ctx) -> None:
    """Subtract the mean output shift that rounding each layer's weights causes from its bias."""
    correct_bias(ctx.prepared, ctx.calib.to(ctx.config.device), ctx.config.forward_batch)
