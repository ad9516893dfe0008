"""AdaQuant layer-wise calibration (Hubara et al., 2021): the steps `adaquant` (the mode the
settings say; `auto`: sequential, except in a candidate's recipe before bit allocation, which
is parallel) and `adaquant_sequential` (sequential whatever they say: after bit allocation it
corrects the errors the chosen mix accumulates, layer after layer)."""

from dataclasses import replace

from ..calibrate.adaquant import AdaQuantConfig, adaquant as run_adaquant
from ..errors import Sub8Error
from ..registry import register


def _parallel_only(config) -> None:
    if config.adaquant.mode == "sequential":
        raise Sub8Error("AdaQuant before bit allocation must be parallel: sequential results depend "
                        "on the other layers' bits")


def _run(ctx, cfg) -> dict:
    if cfg.mode == "auto":  # a candidate's recipe must not depend on the other layers' bits
        cfg = replace(cfg, mode="parallel" if ctx.candidate else "sequential")
    c = ctx.config
    return run_adaquant(ctx.prepared, ctx.calib.to(c.device), cfg, c.forward_batch, c.seed,
                        checkpoints=ctx.inside(), output_loss=c.output_loss, executor=ctx.executor)


@register("adaquant", settings=AdaQuantConfig, per_layer=_parallel_only)
def adaquant(ctx) -> dict:
    """AdaQuant on every quantized layer: weights, bias and quantizer steps fit to the float output."""
    return _run(ctx, ctx.config.adaquant)


@register("adaquant_sequential", settings=AdaQuantConfig, settings_key="adaquant")
def adaquant_sequential(ctx) -> dict:
    """Sequential AdaQuant whatever the mode setting says."""
    return _run(ctx, replace(ctx.config.adaquant, mode="sequential"))
