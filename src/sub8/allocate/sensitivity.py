"""Per-layer sensitivity: how much an output loss grows when one layer alone takes a precision.

The loss compares the model's outputs with the float model's on the calibration set, without
labels: KL(float || quantized) of the softmax outputs (classifiers) or the mean squared error of
the outputs (feature extractors). Every layer sits at its base-precision state except the one
measured, which takes its own state for the candidate precision (its own range calibration or
parallel-AdaQuant result), so that per-layer entries add up to predict a mixed model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SENSITIVITY_LOSSES
from ..errors import Sub8Error


def output_loss(kind: str, quant: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The summed loss over a batch (divide by the sample count for the mean)."""
    quant, reference = quant.double(), reference.double()
    if kind == "kl":
        f = F.log_softmax(reference.flatten(1), dim=1)
        q = F.log_softmax(quant.flatten(1), dim=1)
        return (f.exp() * (f - q)).sum()
    if kind == "mse":
        return ((quant - reference) ** 2).flatten(1).mean(dim=1).sum()
    raise Sub8Error(f"unknown sensitivity loss {kind!r}; choose one of {', '.join(SENSITIVITY_LOSSES)}")


@torch.no_grad()
def model_loss(module, calib: torch.Tensor, reference: torch.Tensor, kind: str, batch: int) -> float:
    device = next(module.parameters()).device
    total = 0.0
    for i in range(0, len(calib), batch):
        out = module(calib[i:i + batch].to(device))
        total += output_loss(kind, out.float().cpu(), reference[i:i + batch]).item()
    return total / len(calib)


@torch.no_grad()
def measure(module, qlayers: dict, layers: list[str], base_states: dict, states: dict[tuple, dict],
            calib: torch.Tensor, reference: torch.Tensor, kind: str, batch: int,
            progress=None) -> dict[tuple, dict[str, float]]:
    """{precision: {layer: loss with that layer alone at that precision}}; `module` must hold
    the base states on entry and holds them again on return."""
    out = {}
    for p, per_layer in states.items():
        out[p] = {}
        for name in layers:
            layer = qlayers[name]
            layer.load_state_dict(per_layer[name])
            try:
                out[p][name] = model_loss(module, calib, reference, kind, batch)
            finally:
                layer.load_state_dict(base_states[name])
            if progress is not None:
                progress.update(1)
    return out
