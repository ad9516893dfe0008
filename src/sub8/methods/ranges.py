"""Range calibration (min-max, percentile, MSE-optimal clipping): round-to-nearest alone."""

from ..calibrate.ranges import calibrate_ranges
from ..registry import register


def _per_layer(config) -> None:
    """Each layer's ranges come from the float model's inputs: always per layer."""


@register("ranges", per_layer=_per_layer)
def ranges(ctx) -> None:
    """Set every quantizer's step and zero point from the float model's statistics."""
    c = ctx.config
    calibrate_ranges(ctx.prepared, ctx.calib.to(c.device), c.ranges, c.percentile, c.forward_batch, c.seed)
