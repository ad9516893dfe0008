"""Recipes: a pipeline is a list of steps, each a plain function over one Run.

model + calibration data -> prepare -> steps -> evaluate. A new method is a new step.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from .allocate import allocate
from .cache import DiskCache, tensor_digest
from .calibrate import adaquant, calibrate_ranges, correct_bias, tune_batchnorm, tune_biases
from .config import QuantConfig
from .errors import Sub8Error
from .evaluate import compare, predict
from .prepare import PreparedModel, prepare
from .report import TOOL, StepLog, versions
from .resume import Checkpoints, module_state
from .size import size_report


@dataclass
class Run:
    config: QuantConfig
    prepared: PreparedModel
    calib: torch.Tensor
    model: nn.Module | None = None      # the user's float model
    recipe: tuple[str, ...] = ()        # per-layer steps that bit allocation replays per precision
    checkpoints: Checkpoints | None = None
    done: tuple[str, ...] = ()          # the steps finished before the current one
    fresh: bool = False                 # read nothing from the disk cache


def step_ranges(run: Run) -> None:
    c = run.config
    calibrate_ranges(run.prepared, run.calib.to(c.device), c.ranges, c.percentile, c.forward_batch, c.seed)


def step_bias_correction(run: Run) -> None:
    correct_bias(run.prepared, run.calib.to(run.config.device), run.config.forward_batch)


def _inside(run: Run):
    """Checkpoints inside the current step (AdaQuant resumes after its last finished group)."""
    return None if run.checkpoints is None else run.checkpoints.scope("inside", run.done)


def step_adaquant(run: Run) -> dict:
    c = run.config
    return adaquant(run.prepared, run.calib.to(c.device), c.adaquant, c.forward_batch, c.seed,
                    checkpoints=_inside(run), output_loss=c.output_loss)


def step_adaquant_sequential(run: Run) -> dict:
    """Sequential AdaQuant whatever --adaquant says: after bit allocation it corrects the errors
    the chosen mix accumulates, layer after layer."""
    c = run.config
    cfg = replace(c.adaquant, mode="sequential")
    return adaquant(run.prepared, run.calib.to(c.device), cfg, c.forward_batch, c.seed, checkpoints=_inside(run),
                    output_loss=c.output_loss)


def step_bn_tuning(run: Run) -> dict:
    return tune_batchnorm(run.prepared, run.calib.to(run.config.device), run.config.forward_batch)


def step_bias_tuning(run: Run) -> dict:
    c = run.config
    return tune_biases(run.prepared, run.calib.to(c.device), c.bias_tuning, c.output_loss, c.forward_batch, c.seed)


def step_allocate(run: Run) -> dict:
    """Bit allocation: the steps before it in the pipeline run once per candidate precision."""
    c = run.config

    first_last = {}
    if c.allocation.first_last:  # candidates at `precision` for them too (name patterns, escaped)
        first_last = dict.fromkeys(glob.escape(run.prepared.layers[i].name) for i in (0, -1))

    def run_recipe(precision) -> tuple[PreparedModel, dict]:
        layer_bits = {**{name: precision for name in first_last}, **c.layer_bits}
        config = replace(c, w_bits=precision[0], a_bits=precision[1], layer_bits=layer_bits, steps=run.recipe)
        prepared = prepare(run.model, run.calib[:1], config)
        sub = Run(config, prepared, run.calib)
        records = {name: STEPS[name](sub) for name in run.recipe}
        return prepared, {name: r for name, r in records.items() if r is not None}

    return allocate(run.model, run.prepared, run.calib.to(c.device), c, run.recipe, run_recipe,
                    DiskCache(c.cache_dir, read=not run.fresh))


# A step may return a record; report.json keeps it under the step's name.
STEPS = {"ranges": step_ranges, "bias_correction": step_bias_correction, "adaquant": step_adaquant,
         "allocate": step_allocate, "adaquant_sequential": step_adaquant_sequential,
         "bn_tuning": step_bn_tuning, "bias_tuning": step_bias_tuning}
# Steps that treat every layer on its own (float inputs): they may come before "allocate".
PER_LAYER = ("ranges", "adaquant")
# rtn: round-to-nearest after range calibration, the paper's baseline. light and advanced (the
# paper's recipes): bits allocated by integer programming over per-layer range calibration, or
# over parallel AdaQuant; then (advanced) sequential AdaQuant on the mix; then BN and bias tuning.
PIPELINES = {"rtn": ("ranges",), "adaquant": ("ranges", "adaquant"),
             "light": ("ranges", "allocate", "bn_tuning", "bias_tuning"),
             "advanced": ("ranges", "adaquant", "allocate", "adaquant_sequential", "bn_tuning", "bias_tuning")}


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


def fidelity(prepared, config, eval_images, float_logits, eval_labels, output, probe) -> dict:
    """The quantized model's metrics against the float model's outputs (evaluate.compare)."""
    quant_logits = predict(prepared.module, eval_images, config.forward_batch, config.device)
    return compare(float_logits, quant_logits, eval_labels, output, probe)


def quantize(model: nn.Module, calib, config: QuantConfig | None = None,
             eval_images: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
             float_logits: torch.Tensor | None = None, fresh: bool = False, probe=None) -> QuantizedModel:
    """Quantize `model` with `config.pipeline` on `calib`; evaluate against the float model on
    `eval_images` when given (`float_logits`, if the caller has them already, saves a pass;
    `probe`, a fitted text.probe.Probe, gives a sentence encoder's accuracy with `eval_labels`).

    An interrupted run with the same model, data and config resumes after its last finished
    step (or AdaQuant group) from `config.cache_dir`; `fresh=True` starts over."""
    config = config or QuantConfig()
    output = getattr(model, "sub8_output", "logits")  # "embedding" for sentence encoders
    if config.output_loss is None:
        config = replace(config, output_loss="mse" if output == "embedding" else "kl")
    recipe, steps = split_recipe(config, pipeline_steps(config))
    calib = as_tensor(calib)
    torch.manual_seed(config.seed)
    log = StepLog()
    with log.step("prepare", config.device):
        prepared = prepare(model, calib[:1], config)
    checkpoints = Checkpoints(DiskCache(config.cache_dir, read=not fresh), model, calib, config.to_dict())
    run = Run(config, prepared, calib, model=model, recipe=recipe, checkpoints=checkpoints, fresh=fresh)
    evaluate = None
    if eval_images is not None:
        with log.step("evaluate", config.device):  # the float model's outputs, once
            if float_logits is None:
                float_logits = predict(model.to(config.device).eval(), eval_images,
                                       config.forward_batch, config.device)
        evaluate = partial(fidelity, prepared, config, eval_images, float_logits, eval_labels, output, probe)
    records, metrics = {}, None
    eval_key = None if eval_images is None else tensor_digest([eval_images])
    for k, name in enumerate(steps):
        run.done = steps[:k]
        saved = checkpoints.load("step", steps[:k + 1], eval_key)
        if saved is not None:  # finished by an interrupted run of the same command
            prepared.module.load_state_dict(saved["state"])
            prepared.sync_bits()
            records, entry = saved["records"], saved["entry"]
            log.steps.append({**entry, "resumed": True})
            metrics = entry.get("metrics")
            continue
        with log.step(name, config.device) as entry:
            record = STEPS[name](run)
        if record is not None:
            records[name] = record
        if evaluate is not None:  # what each step adds: the paper's ablation in one run
            start = time.perf_counter()
            metrics = entry["metrics"] = evaluate()
            entry["eval_seconds"] = time.perf_counter() - start
        checkpoints.save({"state": module_state(prepared.module), "records": records, "entry": entry},
                         "step", steps[:k + 1], eval_key)
    checkpoints.clear()
    report = {"tool": TOOL, "config": config.to_dict(), "seed": config.seed, "versions": versions(),
              "calibration": {"n_images": len(calib)},
              "layers": [info.to_dict() for info in prepared.layers], **prepared.other_quantizers(),
              "size": size_report(prepared), "steps": log.steps, **records}
    if metrics is not None:
        report["metrics"] = {"float": compare(float_logits, float_logits, eval_labels, output, probe),
                             "quantized": metrics}
    return QuantizedModel(prepared, report)
