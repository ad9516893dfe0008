"""BN tuning: re-estimate the statistics of every folded BatchNorm on the quantized model.

Quantization shifts and rescales the channels of each conv's output. For each conv whose
BatchNorm was folded, a BatchNorm is put back after it, set up so that it maps the channel
statistics the quantized model produces onto those the float model produces on the same
calibration images (with no quantization it is the identity). Its statistics are plain averages
over the whole calibration set, not a momentum average. It is then folded back:
    y' = a * y + c,  a = std_float / std_quant,  c = mean_float - a * mean_quant  (per channel)
which scales the layer's weights, bias and per-channel weight step by a: the integer codes are
unchanged. Correcting a layer changes what the layers after it see, so the statistics are
measured again after each pass of corrections (`passes`).
"""

from __future__ import annotations

import torch

from ..prepare import PreparedModel
from ..quant.layers import QuantLayer, float_mode

MIN_STD = 1e-6  # a channel that does not vary keeps its scale


class ChannelStats:
    """Per-channel mean and standard deviation of a layer's output over every sample seen."""

    def __init__(self):
        self.total = self.squares = None
        self.count = 0

    @torch.no_grad()
    def __call__(self, module, inputs, out) -> None:
        flat = out.detach().movedim(1, -1).reshape(-1, out.shape[1]).double()
        s, q = flat.sum(0), (flat * flat).sum(0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += flat.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0)
        return mean, var.sqrt()


@torch.no_grad()
def channel_stats(module, layers: dict[str, QuantLayer], calib: torch.Tensor, batch: int) -> dict:
    stats = {n: ChannelStats() for n in layers}
    handles = [layers[n].register_forward_hook(stats[n]) for n in layers]
    device = next(module.parameters()).device
    try:
        for i in range(0, len(calib), batch):
            module(calib[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: s.mean_std() for n, s in stats.items()}


@torch.no_grad()
def rescale_channels(layer: QuantLayer, a: torch.Tensor, c: torch.Tensor) -> None:
    """y -> a * y + c per output channel, folded into weight, bias and weight step (a > 0)."""
    w, b, q = layer.layer.weight, layer.layer.bias, layer.weight_quantizer
    shape = (-1,) + (1,) * (w.dim() - 1)
    if q.enabled:
        codes = q.codes(w)
        q.step.mul_(a.to(q.step.dtype))
        w.copy_(q.dequantize(codes))  # the same codes on the scaled grid
    else:
        w.mul_(a.to(w.dtype).view(shape))
    b.mul_(a.to(b.dtype)).add_(c.to(b.dtype))


@torch.no_grad()
def tune_batchnorm(prepared: PreparedModel, calib: torch.Tensor, batch_size: int = 32, passes: int = 2) -> dict:
    """Apply BN tuning to every conv whose BatchNorm was folded. Returns the record for
    report.json: per layer, the largest relative change of a channel's scale and shift."""
    layers = prepared.quant_layers()
    names = [i.name for i in prepared.layers if i.bn_folded]
    if not names:
        return {"layers": {}, "passes": 0}
    targets = {n: layers[n] for n in names}
    reference = {n: layer for n, layer in prepared.reference.named_modules() if n in targets}
    with float_mode(prepared.reference):
        wanted = channel_stats(prepared.reference, reference, calib, batch_size)
    record = {n: {"max_scale_change": 0.0, "max_shift": 0.0} for n in names}
    for _ in range(passes):
        seen = channel_stats(prepared.module, targets, calib, batch_size)
        for n in names:
            (mf, sf), (mq, sq) = wanted[n], seen[n]
            ok = (sq > MIN_STD) & (sf > MIN_STD)
            a = torch.where(ok, sf / sq.clamp_min(MIN_STD), torch.ones_like(sq))
            c = mf - a * mq
            rescale_channels(targets[n], a, c)
            r = record[n]
            r["max_scale_change"] = max(r["max_scale_change"], (a - 1).abs().max().item())
            r["max_shift"] = max(r["max_shift"], (c.abs() / sf.clamp_min(MIN_STD)).max().item())
    return {"layers": record, "passes": passes}
