"""The accuracy/size Pareto front: one allocated, evaluated model per weight-memory budget,
beside the uniform-precision models built from the same candidates.

Every point is a real model: the pipeline runs for each budget (candidates and sensitivities
come from the disk cache after the first), then it is evaluated against the float model.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .allocate.costs import precision_label
from .config import QuantConfig
from .errors import Sub8Error
from .evaluate import predict
from .pipeline import pipeline_steps, quantize

METRIC = "top1_agreement_confident"


def _point(model, calib, evals, float_logits, config, **allocation) -> dict:
    cfg = dataclasses.replace(config, allocation=dataclasses.replace(config.allocation, **allocation))
    start = time.perf_counter()
    report = quantize(model, calib, cfg, eval_images=evals, float_logits=float_logits).report
    a = report["allocate"]
    return {"size_ratio": report["size"]["ratio"], "bops_ratio": a["costs"]["bops"]["ratio"],
            "metrics": report["metrics"]["quantized"], "choice": a["choice"],
            "predicted_degradation": a["predicted_degradation"],
            "measured_degradation": a["measured_degradation"], "seconds": time.perf_counter() - start}


def pareto(model: torch.nn.Module, calib: torch.Tensor, evals: torch.Tensor, config: QuantConfig,
           size_ratios: list[float], echo=print) -> dict:
    if "allocate" not in pipeline_steps(config):
        raise Sub8Error("the Pareto front needs a pipeline with bit allocation: --pipeline light or advanced")
    float_logits = predict(model.to(config.device).eval(), evals, config.forward_batch, config.device)
    budgets = {"bops_ratio": None, "latency_ms": None, "max_degradation": None}
    points, uniform = [], []
    for ratio in size_ratios:
        try:
            row = _point(model, calib, evals, float_logits, config, size_ratio=ratio, **budgets)
        except Sub8Error as exc:
            row = {"error": str(exc)}
        row["budget"] = ratio
        points.append(row)
        echo(format_row(f"size <= {ratio:g}", row))
    # Uniform points: every allocated layer at one precision, from the same cached candidates.
    for p in dict.fromkeys((config.allocation.base, *config.allocation.precisions)):
        row = _point(model, calib, evals, float_logits, config, precisions=(p,), base=p, size_ratio=1.0,
                     ties=(), **budgets)
        row["precision"] = precision_label(p)
        uniform.append(row)
        echo(format_row(f"uniform {row['precision']}", row))
    return {"metric": METRIC, "points": points, "uniform": uniform}


def header() -> str:
    return f"{'model':<18} {'size ratio':>10} {'BOPs ratio':>10} {'conf top1':>9} {'top1':>6} {'KL':>7} {'seconds':>8}"


def format_row(label: str, row: dict) -> str:
    if "error" in row:
        return f"{label:<18} {row['error']}"
    m = row["metrics"]
    conf = m[METRIC]
    return (f"{label:<18} {row['size_ratio']:10.4f} {row['bops_ratio']:10.4f} "
            f"{'n/a' if conf is None else f'{conf:.3f}':>9} {m['top1_agreement']:6.3f} {m['kl']:7.3f} "
            f"{row['seconds']:8.1f}")
