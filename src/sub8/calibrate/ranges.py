"""Range calibration: weight ranges from the weights, activation ranges observed on the
calibration set while the model runs in float. This alone is round-to-nearest (RTN)."""

from __future__ import annotations

import torch

from ..errors import Sub8Error
from ..prepare import PreparedModel
from ..quant.embedding import quant_embeddings
from ..quant.layers import quant_inputs, quant_operands, run_observed
from ..quant.ranges import estimate

SAMPLE_CAP = 2 ** 19  # observed values kept per activation for percentile/MSE searches


class ActivationObserver:
    """Exact min/max of a layer's input plus a uniform random sample of its values."""

    def __init__(self, name: str, per_batch: int, generator: torch.Generator):
        self.name = name
        self.per_batch = per_batch
        self.generator = generator
        self.lo = float("inf")
        self.hi = float("-inf")
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, layer, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        lo, hi = lo.item(), hi.item()
        if not (torch.isfinite(torch.tensor([lo, hi])).all()):
            raise Sub8Error(f"NaN or Inf in the input of layer {self.name!r} during calibration; "
                            f"check the model and the calibration data")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        k = min(flat.numel(), self.per_batch)
        idx = torch.randint(flat.numel(), (k,), generator=self.generator).to(flat.device)
        self.samples.append(flat[idx].cpu())

    def values(self) -> torch.Tensor:
        """The sample, with the exact extremes added so that searches start from the true range."""
        return torch.cat(self.samples + [torch.tensor([self.lo, self.hi])])


@torch.no_grad()
def set_weight_range(layer, method: str, percentile: float) -> None:
    """A layer's (or embedding table's) weight grid from its weight, per output channel."""
    wq = layer.weight_quantizer
    if wq.enabled:
        rows = layer.layer.weight.detach().reshape(wq.step.shape[0], -1)
        wq.set_range(*estimate(rows, method, wq.bits, wq.symmetric, percentile, weights=True))


@torch.no_grad()
def calibrate_ranges(prepared: PreparedModel, calib: torch.Tensor, method: str = "auto",
                     percentile: float = 99.99, batch_size: int = 32, seed: int = 0,
                     layers: bool = True, only: set[str] | None = None) -> dict:
    """Set every quantizer's step and zero point (`layers=False`: only those outside the
    QuantLayers, i.e. embedding tables and attention operands, which bit allocation leaves
    alone; `only`: those of the named layers and sites). Returns the activation ranges seen."""
    weighted = {**(prepared.quant_layers() if layers else {}), **quant_embeddings(prepared.module)}
    if only is not None:
        weighted = {n: m for n, m in weighted.items() if n in only}
    for layer in weighted.values():
        set_weight_range(layer, method, percentile)

    device = next(prepared.module.parameters()).device
    n_batches = -(-len(calib) // batch_size)
    generator = torch.Generator().manual_seed(seed)
    # layer inputs and attention operands, or the operands alone
    sites = quant_inputs(prepared.module) if layers else quant_operands(prepared.module)
    if only is not None:
        sites = {n: m for n, m in sites.items() if n in only}
    observers = {name: ActivationObserver(name, max(1, SAMPLE_CAP // n_batches), generator)
                 for name, site in sites.items() if site.input_quantizer.enabled}
    if observers:
        run_observed(prepared.module, observers, calib, batch_size, desc="activation ranges")

    seen = {}
    for name, obs in observers.items():
        aq = sites[name].input_quantizer
        values = obs.values().to(device)[None]
        aq.set_range(*estimate(values, method, aq.bits, aq.symmetric, percentile))
        seen[name] = (obs.lo, obs.hi)
    return seen
