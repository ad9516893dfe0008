"""Recipes: a pipeline is a list of steps, each a registered method (registry.py) run over one
RunContext.

model + calibration data -> prepare (the model's adapter) -> steps -> evaluate. A new method
is one module that registers a step; nothing here names a method except the recipes below.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from . import progress
from .adapters import adapter_for
from .analyzer import InspectSettings, inspect as inspect_model, split_samples
from .cache import DiskCache, tensor_digest
from .choices import PIPELINE_NAMES
from .config import QuantConfig
from .errors import Sub8Error
from .evaluate import predict
from .executor import Executor, default_executor
from .prepare import QuantizedModel, lowest_bits
from .quant.layers import module_state, smoothable_kind
from .registry import METHODS, RunContext, get
from .report import REPORT_VERSION, TOOL, StepLog, versions
from .resume import Checkpoints
from .size import size_report


# rtn: round-to-nearest after range calibration, the paper's baseline. light and advanced (the
# paper's recipes): bits allocated by integer programming over per-layer range calibration, or
# over parallel AdaQuant; then (advanced) sequential AdaQuant on the mix; then BN and bias tuning.
# auto (the default) picks by precision: see auto_steps.
PIPELINES = {"auto": None, "rtn": ("ranges",), "adaquant": ("ranges", "adaquant"),
             "light": ("ranges", "allocate", "bn_tuning", "bias_tuning"),
             "advanced": ("ranges", "adaquant", "allocate", "adaquant_sequential", "bn_tuning", "bias_tuning")}

assert tuple(PIPELINES) == PIPELINE_NAMES  # (the CLI checks names before importing this module)

# What `--pipeline auto` runs (benchmarks/bench_peers.py compares it): at 8 bits, rounding each
# layer's weights shifts its output channels' means and the shifts add up through the network;
# bias correction removes them for about twice RTN's time. Below 8 bits rounding itself must be
# learned: sequential AdaQuant. A model with attention first moves its Linear inputs' outlier
# features into the weights (SmoothQuant; MiniLM on tweets, peers_text.json and
# reconstruct_text.json); on a CNN, whose one Linear is the classifier, that did not help. A
# model with depthwise or pointwise convolutions equalizes their inputs' channels at 8 bits
# (MobileNetV2: peers_w8a8_seeds.json).
AUTO_8_BITS = ("ranges", "bias_correction")
AUTO_UNDER_8_BITS = ("ranges", "adaquant")


def has_attention(model: nn.Module | None) -> bool:
    """Whether a model has attention: a torch nn.MultiheadAttention, or a module whose class is
    named *Attention (transformers', timm's and torchvision's own attention modules)."""
    return model is not None and any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")
                                     for m in model.modules())


def has_channel_convs(model: nn.Module | None) -> bool:
    """Whether a model has a depthwise or pointwise convolution (MobileNet, EfficientNet)."""
    return model is not None and any(smoothable_kind(m) in ("depthwise", "pointwise") for m in model.modules())


def auto_steps(config: QuantConfig, model: nn.Module | None = None) -> tuple[str, ...]:
    """--pipeline auto: ranges and bias correction when every layer keeps 8 bits, ranges and
    AdaQuant (sequential at a uniform precision) when any has fewer; after the ranges,
    SmoothQuant when `model` has attention, and at 8 bits channel equalization when it has
    depthwise or pointwise convolutions."""
    low = lowest_bits(config)
    if low is None:
        return ("ranges",)
    steps = AUTO_8_BITS if low >= 8 else AUTO_UNDER_8_BITS
    before = (("smooth_quant",) if has_attention(model) else ()) + \
        (("equalize",) if low >= 8 and has_channel_convs(model) else ())
    return (steps[0], *before, *steps[1:])


def auto_requantize(config: QuantConfig, steps: tuple[str, ...]) -> bool:
    """--requantize's default: on when every layer is W8A8 (prepare.junction_bits), except in a
    run that allocates bits. A junction shares the input quantizer of a layer that reads the same
    tensor, so a layer's candidate precision would also reach the skip connection, while the
    integer program assumes that each layer's precision costs what it costs alone."""
    return lowest_bits(config) == 8 and "allocate" not in steps


def pipeline_steps(config: QuantConfig, model: nn.Module | None = None) -> tuple[str, ...]:
    """The steps a config asks for on `model`: its explicit `steps`, else its pipeline's."""
    if config.steps:
        unknown = [s for s in config.steps if s not in METHODS]
        if unknown:
            raise Sub8Error(f"unknown step(s) {', '.join(unknown)}; steps are: {', '.join(METHODS)}")
        if config.steps[0] != "ranges":
            raise Sub8Error("the first step must be 'ranges': every later step needs calibrated ranges")
        return tuple(config.steps)
    if config.pipeline not in PIPELINES:
        raise Sub8Error(f"unknown pipeline {config.pipeline!r}; choose one of {', '.join(PIPELINES)}")
    return auto_steps(config, model) if config.pipeline == "auto" else PIPELINES[config.pipeline]


def split_recipe(config: QuantConfig, steps: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the per-layer recipe that allocation replays, the steps the run itself executes)."""
    if "allocate" not in steps:
        return (), steps
    i = steps.index("allocate")
    recipe = steps[:i]
    bad = [s for s in recipe if get(s).per_layer is None]
    if bad or "allocate" in steps[i + 1:]:
        per_layer = [m.name for m in METHODS.values() if m.per_layer is not None]
        raise Sub8Error(f"only per-layer steps ({', '.join(per_layer)}) may come before 'allocate', "
                        f"once; got {', '.join(steps)}")
    for name in recipe:
        get(name).per_layer(config)
    if not config.allocation.has_budget():
        raise Sub8Error("bit allocation needs a budget: --size-ratio, --bops-ratio, --latency-ms "
                        "or --max-degradation")
    return recipe, steps[i:]


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


def fidelity(prepared, adapter, model, config, eval_images, float_logits, eval_labels, probe) -> dict:
    """The quantized model's metrics against the float model's outputs (the adapter's compare)."""
    quant_logits = predict(prepared.module, eval_images, config.forward_batch, config.device, desc="evaluate")
    return adapter.compare(model, float_logits, quant_logits, eval_labels, probe)


def quantize(model: nn.Module, calib, config: QuantConfig | None = None,
             eval_images: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
             float_logits: torch.Tensor | None = None, fresh: bool = False, probe=None,
             executor: Executor | None = None, inspect: InspectSettings | None = None,
             step_metrics: bool = True) -> QuantizedModel:
    """Quantize `model` with `config.pipeline` on `calib`; evaluate against the float model on
    `eval_images` when given (`float_logits`, if the caller has them already, saves a pass;
    `probe`, a fitted text.probe.Probe, gives a sentence encoder's accuracy with `eval_labels`):
    after every step (what each adds), or with `step_metrics=False` after the last one only.

    An interrupted run with the same model, data and config resumes after its last finished
    step (or AdaQuant group) from `config.cache_dir`; `fresh=True` starts over. `executor` runs
    the independent work (default: in this process; the results do not depend on it).
    `inspect` adds a last stage that finds the sites that hurt (analyzer.py) on the evaluation
    samples, else on the calibration samples."""
    config = config or QuantConfig()
    adapter = adapter_for(model)
    executor = executor or default_executor()
    first_stage = len(executor.stages)
    if config.output_loss is None:
        config = replace(config, output_loss=adapter.default_output_loss(model))
    if config.ranges == "auto":
        config = replace(config, ranges=adapter.default_ranges())
    if config.requantize is None:
        config = replace(config, requantize=auto_requantize(config, pipeline_steps(config, model)))
    recipe, steps = split_recipe(config, pipeline_steps(config, model))
    calib = as_tensor(calib)
    torch.manual_seed(config.seed)
    log = StepLog()
    with log.step("prepare", config.device):
        prepared = adapter.prepare(model, calib[:1], config)
    checkpoints = Checkpoints(DiskCache(config.cache_dir, read=not fresh), model, calib, config.to_dict())
    run = RunContext(config, prepared, calib, model=model, adapter=adapter, executor=executor, recipe=recipe,
                     checkpoints=checkpoints, fresh=fresh)
    evaluate = None
    if eval_images is not None:
        with log.step("evaluate", config.device):  # the float model's outputs, once
            if float_logits is None:
                float_logits = predict(model.to(config.device).eval(), eval_images,
                                       config.forward_batch, config.device, desc="evaluate the float model")
        evaluate = partial(fidelity, prepared, adapter, model, config, eval_images, float_logits, eval_labels, probe)
    records, metrics = {}, None
    # (a step's checkpoint holds its metrics, or none: resuming must not mix the two)
    eval_key = None if eval_images is None else tensor_digest([eval_images]) + ("" if step_metrics else "-last")
    for k, name in enumerate(steps):
        run.done = steps[:k]
        saved = checkpoints.load("step", steps[:k + 1], eval_key)
        stage = f"step {k + 1}/{len(steps)} {name}"
        if saved is not None:  # finished by an interrupted run of the same command
            prepared.module.load_state_dict(saved["state"])
            prepared.sync_bits()
            records, entry = saved["records"], saved["entry"]
            log.steps.append({**entry, "resumed": True})
            metrics = entry.get("metrics")
            progress.say(f"{stage}: resumed, finished by an earlier run of this command (checkpoint in "
                         f"{config.cache_dir}; --fresh starts over)")
            continue
        progress.say(stage)
        with log.step(name, config.device) as entry:
            record = get(name).run(run)
        if record is not None:
            records[name] = record
        # what each step adds: the paper's ablation in one run
        if evaluate is not None and (step_metrics or k == len(steps) - 1):
            start = time.perf_counter()
            metrics = entry["metrics"] = evaluate()
            entry["eval_seconds"] = time.perf_counter() - start
        checkpoints.save({"state": module_state(prepared.module), "records": records, "entry": entry},
                         "step", steps[:k + 1], eval_key)
    checkpoints.clear()
    inspected = None
    if inspect is not None:
        data, fresh = split_samples(eval_images if eval_images is not None else calib, inspect.samples,
                                    inspect.confirm, config.seed)
        progress.say(f"inspect: every quantized site on {len(data)} samples")
        with log.step("inspect", config.device):
            inspected = inspect_model(prepared, prepared.reference, data, config,
                                      lambda f, q: adapter.compare(model, f, q),
                                      lambda: size_report(prepared)["ratio"], top=inspect.top, fresh=fresh)
    report = {"tool": TOOL, "version": REPORT_VERSION, "model_kind": adapter.kind, "config": config.to_dict(), "seed": config.seed, "versions": versions(),
              "calibration": {"n_images": len(calib)},
              "layers": [info.to_dict() for info in prepared.layers], **prepared.other_quantizers(),
              "capture": prepared.capture, "coverage": prepared.coverage,
              "size": size_report(prepared), "steps": log.steps, "executor": executor.summary(first_stage),
              **records}
    if inspected is not None:
        report["inspect"] = inspected
    if metrics is not None:
        report["metrics"] = {"float": adapter.compare(model, float_logits, float_logits, eval_labels, probe),
                             "quantized": metrics}
    return QuantizedModel(prepared, report)
