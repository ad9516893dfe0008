"""SmoothQuant (Xiao et al., 2023): move the activation outliers of a Linear layer's input into
its weights before both are quantized.

A transformer's Linear inputs have a few features whose values are tens of times the others'
(the same features for every token), so one per-tensor activation step must be coarse for all.
With s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), X / s has flatter features and W * s (per
output row, quantized per channel) absorbs them; the float product X W^T is unchanged.

The paper fixes alpha per model (0.5 for OPT, up to 0.85 for others; NNCF's transformer mode
uses 0.95). One alpha for every layer: on MiniLM at W8A8, 0.85, 0.95 and 1.0 end within 0.0004 of
each other in cosine to float (0.996), while letting each layer pick its alpha by the error of its
own quantized product ended at 0.9939, below all three. The report keeps each layer's product
error ||X W^T - Q(X / s) Q(W s)^T||^2 on a sample of its calibration inputs, with and without
smoothing, each grid set by the run's range method.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..quant.layers import QuantLayer, run_observed, weight_over
from ..quant.ranges import estimate

SAMPLE_ROWS = 512  # input rows per layer kept for the product errors in the report
EPS = 1e-5


class FeatureStats:
    """Per input feature, the largest |x| over all rows; and a uniform sample of whole rows."""

    def __init__(self, per_batch: int, generator: torch.Generator):
        self.per_batch, self.generator = per_batch, generator
        self.amax = None
        self.rows: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, layer, x: torch.Tensor) -> None:
        rows = feature_rows(x.detach()).float()
        amax = rows.abs().amax(0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        pick = torch.randint(len(rows), (min(len(rows), self.per_batch),), generator=self.generator)
        self.rows.append(rows[pick.to(rows.device)])

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def feature_rows(x: torch.Tensor) -> torch.Tensor:
    """A Linear's input as rows of features; a pointwise convolution's (N, C, H, W) input as
    N*H*W rows of C channels, its product with the weight being the same matrix product."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def smoothing_factor(x_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """1 / s: what the input is multiplied by (the weight's columns by s). Features that are
    always zero, or whose weights are all zero, keep s = 1."""
    w_amax = weight.detach().reshape(weight.shape[0], -1).abs().amax(0).float()
    s = x_amax.clamp(min=EPS).pow(alpha) / w_amax.clamp(min=EPS).pow(1 - alpha)
    s = torch.where((x_amax > EPS) & (w_amax > EPS), s, torch.ones_like(s)).clamp(1e-4, 1e4)
    return 1.0 / s


ERROR_SAMPLE = 2 ** 16  # input values the input grid for an output error is estimated from


def scaled_input(layer: QuantLayer, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`x` (the layer's input: rows of features, or N, C, H, W) times `factor` per feature."""
    f = factor.to(x)
    return x * (f if isinstance(layer.layer, nn.Linear) else f.view(1, -1, 1, 1))


@torch.no_grad()
def output_error(layer: QuantLayer, x: torch.Tensor, factor: torch.Tensor | None, method: str,
                 percentile: float) -> float:
    """Mean squared error of the layer's quantized output on inputs `x` (as observed, before any
    new factor) against its float output, with the input times `factor` per feature (channel)
    and the weight over it, each grid set by `method` from these tensors (the input's from a
    fixed random subset of its values and their extremes, so that the searches stay fast).
    The layer's grids are left as they were."""
    w = layer.layer.weight.detach().float()
    x = x.to(w.device)
    xs = x if factor is None else scaled_input(layer, x, factor)
    ws = w if factor is None else weight_over(layer.layer, w, factor)
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    grids = {q: copy.deepcopy(q.state_dict()) for q in (wq, aq)}
    wq.set_range(*estimate(ws.reshape(wq.step.shape[0], -1), method, wq.bits, wq.symmetric, percentile,
                           weights=True))
    values = xs.reshape(-1)
    if len(values) > ERROR_SAMPLE:
        pick = torch.randint(len(values), (ERROR_SAMPLE,), generator=torch.Generator().manual_seed(0))
        values = torch.cat([values[pick.to(values.device)], values.min()[None], values.max()[None]])
    aq.set_range(*estimate(values[None], method, aq.bits, aq.symmetric, percentile))
    bias = None if layer.layer.bias is None else layer.layer.bias.detach()
    error = (layer.apply(aq(xs), wq(ws), bias) - layer.apply(x, w, bias)).square().mean().item()
    for q, state in grids.items():
        q.load_state_dict(state)
    return error


def shared_input_quantizers(module: nn.Module) -> set[str]:
    """Layers whose input quantizer also quantizes another tensor (a requantized junction reads
    the same tensor through it: prepare/requantize.py); their input cannot be scaled alone."""
    if not isinstance(module, fx.GraphModule):
        return set()
    return {n.target[:-len(".input_quantizer")] for n in module.graph.nodes
            if n.op == "call_module" and str(n.target).endswith(".input_quantizer")}


def smoothable(prepared) -> dict[str, QuantLayer]:
    """The Linear layers whose input and weight are both quantized, whose input quantizer is
    their own, and whose input has no more bits than its weight: where the input's grid is the
    finer one, moving range into the weight costs more than it saves (MiniLM W4A8 with block
    reconstruction: cosine 0.985 without, 0.975 with; W4A4 and W8A8 gain)."""
    shared = shared_input_quantizers(prepared.module)
    return {n: m for n, m in prepared.quant_layers().items()
            if isinstance(m.layer, nn.Linear) and m.input_quantizer.enabled and m.weight_quantizer.enabled
            and n not in shared and m.a_bits <= m.w_bits}


@torch.no_grad()
def smooth_layers(prepared, calib: torch.Tensor, alpha: float, method: str, percentile: float,
                  batch_size: int, seed: int) -> list[dict]:
    """Smooth every smoothable layer of `prepared` with `alpha` (and the same layer of its float
    reference, whose outputs do not change). Returns, per layer, the product errors with and
    without it and how far the largest input feature stood above the median one. The layers'
    ranges are left for the caller to calibrate again."""
    layers = smoothable(prepared)
    if not layers:
        return []
    n_batches = -(-len(calib) // batch_size)
    generator = torch.Generator().manual_seed(seed)
    stats = {n: FeatureStats(max(1, -(-SAMPLE_ROWS // n_batches)), generator) for n in layers}
    run_observed(prepared.module, stats, calib, batch_size, desc="smoothing statistics")
    reference = dict(prepared.reference.named_modules())
    records = []
    for name, layer in layers.items():
        amax, rows = stats[name].amax, stats[name].sample()
        factor = smoothing_factor(amax, layer.layer.weight, alpha)
        records.append({"name": name, "error_plain": output_error(layer, rows, None, method, percentile),
                         "error": output_error(layer, rows, factor, method, percentile),
                         "input_amax_ratio": (amax.max() / amax.clamp(min=EPS).median()).item()})
        if layer.smooth is not None:  # smoothed before: the new factor comes on top
            factor = factor * layer.smooth
        layer.set_smooth(factor)
        reference[name].set_smooth(factor)
    return records
