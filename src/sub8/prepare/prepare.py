"""prepare(): capture the graph, fold BN, build the layer table, wrap layers, assign bits."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..config import QuantConfig
from ..errors import Sub8Error
from ..quant.layers import QuantLayer, quant_layers
from .fold import fold_batchnorm
from .graph import LayerInfo, analyze, capture


@dataclass
class PreparedModel:
    """A BN-folded copy of the user's model whose Conv2d/Linear layers are QuantLayers."""

    module: fx.GraphModule
    layers: list[LayerInfo]
    float_params: int  # parameters of the user's (unfolded) float model
    # An untouched copy of `module` as prepared: steps that move the float weights (AdaQuant)
    # leave it alone, so later steps still see the exact (BN-folded) float model.
    reference: fx.GraphModule

    def quant_layers(self) -> dict[str, QuantLayer]:
        return quant_layers(self.module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def sync_bits(self) -> None:
        """Copy each layer's bits from its quantizers (after a state was loaded) to the table."""
        layers = self.quant_layers()
        for info in self.layers:
            info.w_bits, info.a_bits = layers[info.name].w_bits, layers[info.name].a_bits


def assign_bits(layers: list[LayerInfo], config: QuantConfig) -> None:
    """Uniform bits, then first/last layer bits, then the user's name patterns (in order)."""
    unmatched = set(config.layer_bits)
    for i, info in enumerate(layers):
        info.w_bits, info.a_bits = config.w_bits, config.a_bits
        if i in (0, len(layers) - 1):
            info.w_bits = info.a_bits = config.first_last_bits
        for pattern, (w, a) in config.layer_bits.items():
            if fnmatch.fnmatchcase(info.name, pattern):
                info.w_bits, info.a_bits = w, a
                unmatched.discard(pattern)
    if unmatched:
        raise Sub8Error(f"--layer-bits pattern(s) {', '.join(sorted(unmatched))} match no layer; "
                        f"layers are named like {layers[0].name!r}")


def prepare(model: nn.Module, example: torch.Tensor, config: QuantConfig) -> PreparedModel:
    """Return a quantizable copy of `model`; `model` itself is left untouched."""
    float_params = sum(p.numel() for p in model.parameters())
    gm = capture(copy.deepcopy(model).cpu())
    folded = fold_batchnorm(gm)
    layers = analyze(gm, example.cpu(), folded)
    if not layers:
        raise Sub8Error("the model has no Conv2d or Linear layer to quantize")
    assign_bits(layers, config)
    for info in layers:
        wrapper = QuantLayer(gm.get_submodule(info.name), info.w_bits, info.a_bits,
                             w_symmetric=config.w_symmetric, a_symmetric=config.a_symmetric)
        gm.set_submodule(info.name, wrapper)
    gm.recompile()
    gm = gm.to(config.device).eval()
    return PreparedModel(module=gm, layers=layers, float_params=float_params, reference=copy.deepcopy(gm))
