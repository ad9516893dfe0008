"""BN tuning: re-estimate the folded BatchNorm statistics on the quantized model."""

from ..calibrate.bn_tuning import tune_batchnorm
from ..registry import register


@register("bn_tuning")
def bn_tuning(ctx) -> dict:
    """Map each folded conv's quantized output statistics back onto the float model's."""
    return tune_batchnorm(ctx.prepared, ctx.calib.to(ctx.config.device), ctx.config.forward_batch)
