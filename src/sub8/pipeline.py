"""Recipes: a pipeline is a list of steps, each a plain function over one Run.

model + calibration data -> prepare -> steps -> evaluate. A new method is a new step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocate import allocate
from .cache import DiskCache
from .calibrate import adaquant, calibrate_ranges, correct_bias
from .config import QuantConfig
from .errors import Sub8Error
from .evaluate import compare, predict
from .prepare import PreparedModel, prepare
from .report import TOOL, StepLog, versions
from .size import size_report


@dataclass
class Run:
    config: QuantConfig
    prepared: PreparedModel
    calib: torch.Tensor
    model: nn.Module | None = None      # the user's float model
    recipe: tuple[str, ...] = ()        # per-layer steps that bit allocation replays per precision


def step_ranges(run: Run) -> None:
    c = run.config
    calibrate_ranges(run.prepared, run.calib.to(c.device), c.ranges, c.percentile, c.forward_batch, c.seed)


def step_bias_correction(run: Run) -> None:
    correct_bias(run.prepared, run.calib.to(run.config.device), run.config.forward_batch)


def step_adaquant(run: Run) -> dict:
    c = run.config
    return adaquant(run.prepared, run.calib.to(c.device), c.adaquant, c.forward_batch, c.seed)


def step_allocate(run: Run) -> dict:
    """Bit allocation: the steps before it in the pipeline run once per candidate precision."""
    c = run.config

    def run_recipe(precision) -> PreparedModel:
        config = dataclasses.replace(c, w_bits=precision[0], a_bits=precision[1], steps=run.recipe)
        prepared = prepare(run.model, run.calib[:1], config)
        sub = Run(config, prepared, run.calib)
        for name in run.recipe:
            STEPS[name](sub)
        return prepared

    return allocate(run.model, run.prepared, run.calib.to(c.device), c, run.recipe, run_recipe,
                    DiskCache(c.cache_dir))


# A step may return a record; report.json keeps it under the step's name.
STEPS = {"ranges": step_ranges, "bias_correction": step_bias_correction, "adaquant": step_adaquant,
         "allocate": step_allocate}
# Steps that treat every layer on its own (float inputs): they may come before "allocate".
PER_LAYER = ("ranges", "adaquant")
# rtn: round-to-nearest after range calibration, the paper's baseline. light/advanced: bits
# allocated by integer programming over per-layer range calibration, or parallel AdaQuant.
PIPELINES = {"rtn": ("ranges",), "adaquant": ("ranges", "adaquant"),
             "light": ("ranges", "allocate"), "advanced": ("ranges", "adaquant", "allocate")}


def pipeline_steps(config: QuantConfig) -> tuple[str, ...]:
    """The steps a config asks for: its explicit `steps`, else its pipeline's."""
    if config.steps:
        unknown = [s for s in config.steps if s not in STEPS]
        if unknown:
            raise Sub8Error(f"unknown step(s) {', '.join(unknown)}; steps are: {', '.join(STEPS)}")
        if config.steps[0] != "ranges":
            raise Sub8Error("the first step must be 'ranges': every later step needs calibrated ranges")
        return tuple(config.steps)
    if config.pipeline not in PIPELINES:
        raise Sub8Error(f"unknown pipeline {config.pipeline!r}; choose one of {', '.join(PIPELINES)}")
    return PIPELINES[config.pipeline]


def split_recipe(config: QuantConfig, steps: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the per-layer recipe that allocation replays, the steps the run itself executes)."""
    if "allocate" not in steps:
        return (), steps
    i = steps.index("allocate")
    recipe = steps[:i]
    bad = [s for s in recipe if s not in PER_LAYER]
    if bad or "allocate" in steps[i + 1:]:
        raise Sub8Error(f"only per-layer steps ({', '.join(PER_LAYER)}) may come before 'allocate', "
                        f"once; got {', '.join(steps)}")
    if "adaquant" in recipe and config.adaquant.mode != "parallel":
        raise Sub8Error("AdaQuant before bit allocation must be parallel: sequential results depend "
                        "on the other layers' bits")
    if not config.allocation.has_budget():
        raise Sub8Error("bit allocation needs a budget: --size-ratio, --bops-ratio, --latency-ms "
                        "or --max-degradation")
    return recipe, steps[i:]


@dataclass
class QuantizedModel:
    prepared: PreparedModel
    report: dict = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return self.prepared.module

    def __call__(self, x):
        return self.prepared.module(x)


def as_tensor(data) -> torch.Tensor:
    """Calibration data as one N x ... tensor: a tensor, or an iterable of tensor batches."""
    if isinstance(data, torch.Tensor):
        tensor = data
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
        if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
            raise Sub8Error("calibration data must be a tensor or an iterable of tensor batches")
        tensor = torch.cat(batches)
    if len(tensor) == 0:
        raise Sub8Error("the calibration data is empty")
    return tensor.float()


def quantize(model: nn.Module, calib, config: QuantConfig | None = None,
             eval_images: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
             float_logits: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize `model` with `config.pipeline` on `calib`; evaluate against the float model on
    `eval_images` when given (`float_logits`, if the caller has them already, saves a pass)."""
    config = config or QuantConfig()
    recipe, steps = split_recipe(config, pipeline_steps(config))
    calib = as_tensor(calib)
    torch.manual_seed(config.seed)
    log = StepLog()
    with log.step("prepare", config.device):
        prepared = prepare(model, calib[:1], config)
    run = Run(config, prepared, calib, model=model, recipe=recipe)
    records = {}
    for name in steps:
        with log.step(name, config.device):
            record = STEPS[name](run)
        if record is not None:
            records[name] = record
    report = {"tool": TOOL, "config": config.to_dict(), "seed": config.seed, "versions": versions(),
              "calibration": {"n_images": len(calib)},
              "layers": [info.to_dict() for info in prepared.layers],
              "size": size_report(prepared), "steps": log.steps, **records}
    if eval_images is not None:
        with log.step("evaluate", config.device):
            if float_logits is None:
                float_logits = predict(model.to(config.device).eval(), eval_images,
                                       config.forward_batch, config.device)
            quant_logits = predict(prepared.module, eval_images, config.forward_batch, config.device)
            report["metrics"] = {"float": compare(float_logits, float_logits, eval_labels),
                                 "quantized": compare(float_logits, quant_logits, eval_labels)}
    return QuantizedModel(prepared, report)
