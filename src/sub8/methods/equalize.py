"""Channel equalization: per-channel scaling of depthwise and pointwise convolution inputs, and of
linear residual streams, into the weights (calibrate/equalize.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..calibrate.equalize import equalize_inputs
from ..errors import Sub8Error
from ..registry import register, setting


@dataclass
class EqualizeConfig:
    alpha: float = setting(0.5, flag="--equalize-alpha", type=float,
                           help="the share of each pointwise convolution input channel's (and residual stream "
                                "channel's) range moved into the weights, in [0, 1] (depthwise inputs are "
                                "equalized fully: it is free)")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise Sub8Error(f"equalize.alpha must be in [0, 1], got {self.alpha}")


@register("equalize", settings=EqualizeConfig)
def equalize(ctx) -> dict:
    """Scale each depthwise and pointwise convolution's input channels, and each linear residual
    stream's, toward one range (the weights by the inverse; the float output unchanged) and set
    their grids again, from one pass over the calibration data."""
    c, cfg = ctx.config, ctx.config.equalize
    start = time.perf_counter()
    records = equalize_inputs(ctx.prepared, ctx.calib.to(c.device), cfg.alpha, c.ranges, c.percentile,
                              c.forward_batch, c.seed)
    return {"alpha": cfg.alpha, "seconds": time.perf_counter() - start, "layers": records}
