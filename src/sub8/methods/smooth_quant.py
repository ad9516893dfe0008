"""SmoothQuant: per-feature scaling of Linear inputs into their weights (calibrate/smooth.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..calibrate.ranges import calibrate_ranges
from ..calibrate.smooth import smooth_layers
from ..errors import Sub8Error
from ..registry import register, setting


@dataclass
class SmoothQuantConfig:
    alpha: float = setting(0.95, flag="--smooth-alpha", type=float,
                           help="SmoothQuant's migration strength in [0, 1]: the share of each input "
                                "feature's range moved into the weights")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise Sub8Error(f"smooth_quant.alpha must be in [0, 1], got {self.alpha}")


@register("smooth_quant", settings=SmoothQuantConfig)
def smooth_quant(ctx) -> dict:
    """Scale each Linear's input features by 1 / s and its weight's columns by s (the float
    output unchanged) where the input has no more bits than the weight, then calibrate those
    layers' ranges again."""
    c, cfg = ctx.config, ctx.config.smooth_quant
    start = time.perf_counter()
    calib = ctx.calib.to(c.device)
    records = smooth_layers(ctx.prepared, calib, cfg.alpha, c.ranges, c.percentile, c.forward_batch, c.seed)
    if records:
        calibrate_ranges(ctx.prepared, calib, c.ranges, c.percentile, c.forward_batch, c.seed,
                         only={r["name"] for r in records})
    return {"alpha": cfg.alpha, "seconds": time.perf_counter() - start, "layers": records}
