"""The accuracy/size Pareto front: one allocated, evaluated model per weight-memory budget,
beside the uniform-precision models built from the same candidates.

Every point is a real model: the pipeline runs for each budget (candidates and sensitivities
come from the disk cache after the first), then it is evaluated against the float model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .adapters import adapter_for
from .allocate.costs import precision_label
from .config import QuantConfig
from .errors import Sub8Error
from .evaluate import predict
from .executor import Executor, default_executor
from .pipeline import pipeline_steps, quantize


@dataclass
class PointWork:
    """One point of the front: the run with these allocation settings, evaluated."""
    model: torch.nn.Module
    calib: torch.Tensor
    evals: torch.Tensor
    float_logits: torch.Tensor
    config: QuantConfig
    allocation: dict          # the allocation settings this point changes
    label: str
    eval_labels: torch.Tensor | None = None
    probe: object = None


def pareto_point(work: PointWork) -> dict:
    cfg = dataclasses.replace(work.config, allocation=dataclasses.replace(work.config.allocation, **work.allocation))
    start = time.perf_counter()
    try:
        report = quantize(work.model, work.calib, cfg, eval_images=work.evals, float_logits=work.float_logits,
                          eval_labels=work.eval_labels, probe=work.probe).report
    except Sub8Error as exc:
        return {"error": str(exc)}
    a = report["allocate"]
    return {"size_ratio": report["size"]["ratio"], "bops_ratio": a["costs"]["bops"]["ratio"],
            "metrics": report["metrics"]["quantized"], "choice": a["choice"],
            "predicted_degradation": a["predicted_degradation"],
            "measured_degradation": a["measured_degradation"], "seconds": time.perf_counter() - start}


def pareto(model: torch.nn.Module, calib: torch.Tensor, evals: torch.Tensor, config: QuantConfig,
           size_ratios: list[float], echo=print, executor: Executor | None = None, eval_labels=None,
           probe=None) -> dict:
    """One allocated model per size ratio, then the uniform precisions; each a work item for
    `executor` (in this process by default), each row echoed as it arrives."""
    if "allocate" not in pipeline_steps(config):
        raise Sub8Error("the Pareto front needs a pipeline with bit allocation: --pipeline light or advanced")
    executor = executor or default_executor()
    metric = adapter_for(model).headline_metric(model)
    float_logits = predict(model.to(config.device).eval(), evals, config.forward_batch, config.device)
    budgets = {"bops_ratio": None, "latency_ms": None, "max_degradation": None}

    def work(allocation, label):
        return PointWork(model, calib, evals, float_logits, config, {**allocation, **budgets}, label, eval_labels,
                         probe)

    # The budget points first; then the uniform points: every allocated layer at one precision,
    # from the same cached candidates.
    items = [work({"size_ratio": ratio}, f"size <= {ratio:g}") for ratio in size_ratios]
    precisions = list(dict.fromkeys((config.allocation.base, *config.allocation.precisions)))
    items += [work({"precisions": (p,), "base": p, "size_ratio": 1.0, "ties": ()}, f"uniform {precision_label(p)}")
              for p in precisions]
    points, uniform = [], []
    for k, (item, row) in enumerate(zip(items, executor.map(pareto_point, items))):
        if k < len(size_ratios):
            row["budget"] = size_ratios[k]
            points.append(row)
        else:
            if "error" in row:  # a uniform point is always within its budget: a real failure
                raise Sub8Error(row["error"])
            row["precision"] = precision_label(precisions[k - len(size_ratios)])
            uniform.append(row)
        echo(format_row(item.label, row, metric))
    return {"metric": metric, "points": points, "uniform": uniform}


def header() -> str:
    return f"{'model':<18} {'size ratio':>10} {'BOPs ratio':>10} {'metric':>9} {'top1':>6} {'KL':>7} {'seconds':>8}"


def format_row(label: str, row: dict, metric: str) -> str:
    if "error" in row:
        return f"{label:<18} {row['error']}"
    m = row["metrics"]
    value = m.get(metric)
    top1, kl = m.get("top1_agreement"), m.get("kl")
    return (f"{label:<18} {row['size_ratio']:10.4f} {row['bops_ratio']:10.4f} "
            f"{'n/a' if value is None else f'{value:.3f}':>9} {'n/a' if top1 is None else f'{top1:.3f}':>6} "
            f"{'n/a' if kl is None else f'{kl:.3f}':>7} {row['seconds']:8.1f}")
