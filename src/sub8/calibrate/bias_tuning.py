"""Bias tuning: train only the biases of the quantized model so that its outputs match the
float model's on the calibration set, without labels.

Loss: KL(float || quantized) of the softmax outputs for classifiers, or the mean squared error of
the outputs for feature extractors (the allocation's sensitivity loss). Every other tensor stays
frozen; quantizers round with straight-through gradients. A held-out share of the calibration
samples never enters training and reports the loss before and after, so over-fitting shows;
when the held-out loss got worse, the trained tensors are put back as they were (`reverted`).
Optionally (`input_ranges`) input steps train too: the last layer's (the range of the features
the classifier reads, which clipping or a coarse grid hurts most at low bits), or every layer's.
A range that minimizes a tensor's or a layer's own error can be far from what the output needs:
at 4 bits, the MSE range of MobileNetV2's residual stream spans a few channels far wider than
the rest, whose clipping costs the output little, and rounds the narrow ones to zero, which
destroys it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import progress
from ..errors import Sub8Error
from ..evaluate import output_loss, predict
from ..prepare import PreparedModel
from ..quant.layers import float_mode
from ..registry import setting
from .adam import MultiTensorAdam
from .split import holdout_split


INPUT_RANGES = ("none", "last", "all")  # which input steps bias tuning also trains


@dataclass
class BiasTuningConfig:
    iters: int = setting(200, flag="--bias-iters", help="bias tuning iterations")
    batch_size: int = setting(32, flag="--bias-batch-size", help="bias tuning mini-batch")
    lr: float = setting(1e-3, flag="--bias-lr", help="bias tuning Adam rate (decayed along a half cosine)")
    holdout: float = setting(0.1, flag="--holdout", help="share of calibration samples kept out of "
                             "AdaQuant and bias tuning to measure them")
    # Also train input steps: the last layer's (the paper's option) or every layer's. The rate
    # is relative to each step: an Adam move of range_lr times its initial value per iteration,
    # at most. On MobileNetV2 at A4, trained input steps shrank up to 14x from the MSE ranges.
    input_ranges: str = setting("none", flag="--bias-tune-ranges", choices=INPUT_RANGES,
                                help="bias tuning also trains the last layer's input step, or every layer's")
    range_lr: float = setting(3e-2, flag="--bias-range-lr",
                              help="bias tuning's rate for input steps, relative to each step")

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.lr <= 0 or self.range_lr <= 0:
            raise Sub8Error("bias tuning needs bias_tuning.iters >= 0, bias_tuning.batch_size >= 1 and "
                            "positive learning rates")
        if not 0.0 < self.holdout < 1.0:
            raise Sub8Error(f"bias_tuning.holdout must be in (0, 1), got {self.holdout}")
        if self.input_ranges not in INPUT_RANGES:
            raise Sub8Error(f"bias_tuning.input_ranges must be one of {', '.join(INPUT_RANGES)}, "
                            f"got {self.input_ranges!r}")


def _mean_loss(kind, out, target) -> torch.Tensor:
    return output_loss(kind, out, target) / len(out)


def tune_biases(prepared: PreparedModel, calib: torch.Tensor, cfg: BiasTuningConfig | None = None,
                loss: str = "kl", batch_size: int = 32, seed: int = 0) -> dict:
    cfg = cfg or BiasTuningConfig()
    module = prepared.module
    device = next(module.parameters()).device
    with float_mode(prepared.reference):
        target = predict(prepared.reference, calib, batch_size, str(device))
    train, held = holdout_split(len(calib), cfg.holdout, seed, "bias tuning")

    def held_loss() -> float:
        with torch.no_grad():
            out = predict(module, calib[held], batch_size, str(device))
        return _mean_loss(loss, out, target[held]).item()

    layers = prepared.quant_layers()
    trained = [layer.layer.bias for layer in layers.values()]
    rates = [cfg.lr] * len(trained)
    names = {"none": [], "last": [prepared.layers[-1].name], "all": list(layers)}[cfg.input_ranges]
    ranged = {name: layers[name].input_quantizer for name in names if layers[name].input_quantizer.enabled}
    steps_before = {name: q.step.item() for name, q in ranged.items()}
    trained += [q.step for q in ranged.values()]
    rates += [cfg.range_lr * step for step in steps_before.values()]
    frozen = [p for p in module.parameters() if p.requires_grad]
    before = held_loss()
    start = [t.detach().clone() for t in trained]
    for p in frozen:
        p.requires_grad_(False)
    for b in trained:
        b.requires_grad_(True)
    opt = MultiTensorAdam(trained, rates)
    g = torch.Generator().manual_seed(seed)
    batch = min(cfg.batch_size, len(train))
    shown = progress.bar(cfg.iters, "bias tuning", "it")
    try:
        for it in range(cfg.iters):
            idx = train[torch.randint(len(train), (batch,), generator=g)]
            opt.zero_grad()
            out = module(calib[idx].to(device))
            _mean_loss(loss, out.float(), target[idx].to(device)).backward()
            opt.step(0.5 * (1 + math.cos(math.pi * it / cfg.iters)))
            with torch.no_grad():
                for q in ranged.values():
                    q.step.clamp_(min=1e-12)  # a step must stay positive
            shown.update(1)
    finally:
        shown.close()
        for b in trained:
            b.requires_grad_(False)
            b.grad = None
        for p in frozen:
            p.requires_grad_(True)
    after = held_loss()
    reverted = after > before
    if reverted:
        with torch.no_grad():
            for t, t0 in zip(trained, start):
                t.copy_(t0)
    record = {"settings": asdict(cfg), "loss": loss, "n_train": len(train), "n_heldout": len(held),
              "heldout_loss_before": before, "heldout_loss_after": after, "reverted": reverted}
    if ranged:
        record["input_ranges"] = {name: {"step_before": steps_before[name], "step_after": q.step.item()}
                                  for name, q in ranged.items()}
    return record
