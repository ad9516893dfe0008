"""Channel equalization of convolution inputs: one per-tensor grid that fits every channel.

A MobileNet-style network feeds its convolutions tensors whose channels' ranges differ by
orders of magnitude (the expansion outputs after ReLU6, the depthwise outputs, the linear
bottlenecks), so one per-tensor activation step is coarse for the narrow channels. Scaling
input channel c by f_c and the weight slices that read it by 1 / f_c keeps the float output
(the factor is the layer's `smooth`, quant/layers.py):

- a depthwise convolution's output channel reads one input channel and its weight grid is per
  output channel, so the scaling is free for the weight: f_c = max_k amax_k / amax_c makes every
  channel span the same range, and the per-tensor grid on the scaled input is a per-channel grid
  on the plain one (what NNCF places on these inputs);
- a pointwise (1x1) convolution is a Linear over the channels: its weight's columns take the
  range, so the factor balances the two as SmoothQuant does, s_c = amax_c^alpha /
  wmax_c^(1 - alpha) (calibrate/smooth.py), and only where the input has no more bits than the
  weight.

A factor is kept only where it lowers the layer's quantized output error on a few calibration
inputs. Only inputs whose factor can move into the convolution that produced them are equalized
(prepare/channel_fold.py), where the ONNX export puts it, so that every convolution stays on
ONNX Runtime's integer kernels.

An input that also feeds a residual add shares its grid with the add, so it is scaled with the
whole residual stream instead (prepare/residual_stream.py): every producing convolution's output
channels times f, every reader's weight slices over f, SmoothQuant's factor against the readers'
weights, kept only where it lowers the readers' summed output error. MobileNetV2 W8A8, three
calibration draws, KL to float: 0.052 with it, 0.058 before it (benchmarks/results/
peers_w8a8_seeds.json, at dbf796b and at 456336b).
"""

from __future__ import annotations

import torch

from ..prepare.channel_fold import fold_chains
from ..prepare.residual_stream import Stream, residual_streams
from ..quant.layers import QuantLayer, quant_inputs, run_observed, smoothable_kind, weight_over
from ..quant.ranges import estimate
from .ranges import SAMPLE_CAP, set_weight_range
from .smooth import output_error, shared_input_quantizers, smoothing_factor

EPS = 1e-6
MAX_FACTOR = 1e4
SAMPLE_IMAGES = 8  # inputs per layer kept for the output errors in the report


class ChannelStats:
    """Per input channel, the smallest and largest value seen; a uniform random sample of the
    input's values with their channels (what a range calibration after the scaling estimates
    from, without running the model again); and the first few whole inputs."""

    def __init__(self, per_batch: int, generator: torch.Generator):
        self.per_batch, self.generator = per_batch, generator
        self.amin = self.amax = None
        self.values: list[torch.Tensor] = []
        self.channels: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, layer, x: torch.Tensor) -> None:
        x = x.detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        amin, amax = x.amin(dim=dims), x.amax(dim=dims)
        self.amin = amin if self.amin is None else torch.minimum(self.amin, amin)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        idx = torch.randint(x.numel(), (min(x.numel(), self.per_batch),), generator=self.generator).to(x.device)
        self.values.append(x.reshape(-1)[idx].cpu())
        self.channels.append(((idx // x[0, 0].numel()) % x.shape[1]).cpu())
        if sum(len(k) for k in self.kept) < SAMPLE_IMAGES:
            self.kept.append(x[:SAMPLE_IMAGES].cpu())

    def magnitude(self) -> torch.Tensor:
        """Per channel, the largest |x| seen."""
        return torch.maximum(self.amax.abs(), self.amin.abs())

    def scaled_values(self, factor: torch.Tensor) -> torch.Tensor:
        """The sample of the input times `factor` per channel, with the scaled input's exact
        extremes added (as calibrate/ranges.py's observer adds them)."""
        f = factor.to(self.amax)
        values = torch.cat(self.values).to(f.device) * f[torch.cat(self.channels).to(f.device)]
        return torch.cat([values, (self.amin * f).min()[None], (self.amax * f).max()[None]])

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)[:SAMPLE_IMAGES]


def depthwise_factor(amax: torch.Tensor) -> torch.Tensor:
    """f_c = max_k amax_k / amax_c, at most MAX_FACTOR; a channel that is always zero keeps 1."""
    top = amax.max().clamp(min=EPS)
    factor = (top / amax.clamp(min=EPS)).clamp(max=MAX_FACTOR)
    return torch.where(amax > top * EPS, factor, torch.ones_like(factor))


def bounded(factor: torch.Tensor, amax: torch.Tensor, upper: float) -> torch.Tensor:
    """`factor` raised where needed so that an upper clip `upper` of the input (ReLU6), scaled
    per channel, stays at or above the top of the scaled input's range: the clip then moves
    into the producing layer exactly (prepare/channel_fold.py)."""
    return factor.clamp(min=float((amax * factor).max()) / upper) if upper < float("inf") else factor


def equalizable(prepared) -> dict[str, tuple[QuantLayer, object]]:
    """{name: (layer, its FoldChain)}: the depthwise and pointwise convolutions whose input and
    weight are both quantized, whose input quantizer is their own (a junction sharing it would
    see the scaled tensor) and whose input is another convolution's output through ReLUs only,
    so that the factor folds into that convolution in an export that runs on integers; a
    pointwise one only where its input has no more bits than its weight (where the input's grid
    is the finer one, moving range into the weight costs more than it saves)."""
    shared = shared_input_quantizers(prepared.module)
    chains = fold_chains(prepared.module)
    found = {}
    for name, m in prepared.quant_layers().items():
        kind = smoothable_kind(m.layer)
        if (kind in ("depthwise", "pointwise") and name in chains and m.input_quantizer.enabled
                and m.weight_quantizer.enabled and name not in shared and (kind == "depthwise" or m.a_bits <= m.w_bits)):
            found[name] = (m, chains[name])
    return found


@torch.no_grad()
def equalize_inputs(prepared, calib: torch.Tensor, alpha: float, method: str, percentile: float,
                    batch_size: int, seed: int = 0) -> list[dict]:
    """Equalize the input channels of every equalizable layer of `prepared` (and of the same
    layer of its float reference, whose outputs do not change): depthwise ones fully, pointwise
    ones with `alpha`, each only where that lowers its output error, and set the grids of those
    scaled from the same pass's statistics (the others keep theirs). Returns, per layer,
    its kind, its output error on a few calibration inputs with and without, and how far the
    widest channel stood above the median one; then the same per residual stream."""
    layers = equalizable(prepared)
    sites = quant_inputs(prepared.module)  # by name: every layer and junction quantizer
    streams = [s for s in residual_streams(prepared.module) if _quantized(sites, s)]
    if not layers and not streams:
        return []
    n_batches = -(-len(calib) // batch_size)
    generator = torch.Generator().manual_seed(seed)
    observed = list(layers) + [site for s in streams for site in s.sites]
    stats = {n: ChannelStats(max(1, SAMPLE_CAP // n_batches), generator) for n in observed}
    run_observed(prepared.module, stats, calib, batch_size, desc="channel statistics")
    reference = dict(prepared.reference.named_modules())
    records = []
    for name, (layer, chain) in layers.items():
        seen = stats[name]  # of the input as the layer sees it: times any earlier factor `old`
        amax, x = seen.magnitude(), seen.sample()
        kind = smoothable_kind(layer.layer)
        new = depthwise_factor(amax) if kind == "depthwise" else smoothing_factor(amax, layer.layer.weight, alpha)
        old = torch.ones_like(new) if layer.smooth is None else layer.smooth.to(new)
        new = bounded(new * old, amax / old, chain.upper) / old  # the clip bounds the whole factor
        error_plain = output_error(layer, x, None, method, percentile)
        error = output_error(layer, x, new, method, percentile)
        kept = error < error_plain  # (EfficientNet-Lite0's inputs are balanced: scaling them all cost KL)
        records.append({"name": name, "kind": kind, "folds_into": chain.producer, "error_plain": error_plain,
                        "error": error, "kept": kept,
                        "input_amax_ratio": (amax.max() / amax.clamp(min=EPS).median()).item()})
        if not kept:  # the layer as the ranges step left it
            continue
        layer.set_smooth(new * old)
        reference[name].set_smooth(new * old)
        # the grids of the scaled weight and input, as a range calibration would set them
        set_weight_range(layer, method, percentile)
        aq = layer.input_quantizer
        aq.set_range(*estimate(seen.scaled_values(new)[None].to(aq.step.device), method, aq.bits, aq.symmetric,
                               percentile))
    for stream in streams:
        records.append(_equalize_stream(prepared, sites, stream, stats, alpha, method, percentile))
    return records


def _quantized(sites: dict, stream: Stream) -> bool:
    """Whether some tensor of the stream is quantized, and every consumer's weight: else there
    is no grid to gain on and no weight grid to pay with."""
    return (any(sites[n].input_quantizer.enabled for n in stream.sites)
            and all(sites[n].weight_quantizer.enabled for n in stream.consumers))


@torch.no_grad()
def _equalize_stream(prepared, sites: dict, stream: Stream, stats: dict, alpha: float, method: str,
                     percentile: float) -> dict:
    """Scale a residual stream's channels (prepare/residual_stream.py) by SmoothQuant's factor
    against its pointwise readers' weights (fully where all its readers are depthwise), where
    that lowers the summed output error of its readers, and set the grids that see it.
    `sites`: quant_inputs of the prepared module, its layers among them."""
    amax = torch.stack([stats[n].magnitude() for n in stream.sites]).amax(0)
    pointwise = [sites[n].layer.weight.detach().float() for n in stream.consumers
                 if smoothable_kind(sites[n].layer) == "pointwise"]
    factor = (smoothing_factor(amax, torch.cat([w.reshape(w.shape[0], -1) for w in pointwise]), alpha)
              if pointwise else depthwise_factor(amax))
    factor = factor / factor.max()  # (the scale of the whole stream is free: keep its values' size)
    error_plain = sum(output_error(sites[n], stats[n].sample(), None, method, percentile) for n in stream.consumers)
    error = sum(output_error(sites[n], stats[n].sample(), factor, method, percentile) for n in stream.consumers)
    kept = error < error_plain
    record = {"name": stream.consumers[0], "kind": "stream", "producers": list(stream.producers),
              "consumers": list(stream.consumers), "error_plain": error_plain, "error": error, "kept": kept,
              "input_amax_ratio": (amax.max() / amax.clamp(min=EPS).median()).item()}
    if not kept:
        return record
    reference = dict(prepared.reference.named_modules())
    for modules in (sites, reference):
        for n in stream.producers:
            conv = modules[n].layer
            f = factor.to(conv.weight)
            conv.weight.mul_(f.view(-1, *[1] * (conv.weight.dim() - 1)))
            if conv.bias is not None:
                conv.bias.mul_(f)
        for n in stream.consumers:
            conv = modules[n].layer
            conv.weight.copy_(weight_over(conv, conv.weight, factor))
    for n in (*stream.producers, *stream.consumers):
        set_weight_range(sites[n], method, percentile)
    for n in stream.sites:
        aq = sites[n].input_quantizer
        aq.set_range(*estimate(stats[n].scaled_values(factor)[None].to(aq.step.device), method, aq.bits,
                               aq.symmetric, percentile))
    return record
