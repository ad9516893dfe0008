"""Where a layer's per-channel input factor can move into the layer that produced the input.

A layer's `smooth` factor (quant/layers.py: channel equalization, SmoothQuant) multiplies its
input before the input's quantizer. Left as a Mul, it sits between the producing convolution and
that quantizer, and ONNX Runtime then runs the producer in float (MobileNetV2 W8A8: 16 of 52
convolutions left on integers). When the input is another quantized layer's output passed only
through ReLUs, the factor moves into the producer instead: its output channel c times f_c is
its weight's row c and bias times f_c, the weight codes unchanged on a per-channel grid, and
ReLU(f y) = f ReLU(y) for f > 0. An upper clip (ReLU6's 6) scales to f_c * 6, which the export
writes as a plain ReLU: exact when the consumer's grid ends at or below `upper * min(f)`, where
its quantizer saturates first; channel equalization chooses factors that keep to that bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.layers import QuantLayer


@dataclass(frozen=True)
class FoldChain:
    producer: str                  # the QuantLayer whose output channels take the factor
    activations: tuple[str, ...]   # the graph nodes between them (ReLU, ReLU6)
    upper: float                   # their upper clip; inf when none


def _relu_clip(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """The upper clip of a ReLU-like node (inf for ReLU), None for anything else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU6):
            return 6.0
        if isinstance(m, nn.ReLU):
            return math.inf
        if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
            return float(m.max_val)
        return None
    if node.op == "call_function" and node.target in (torch.relu, F.relu):
        return math.inf
    if node.op == "call_function" and node.target is F.relu6:
        return 6.0
    return None


def fold_chains(module: nn.Module) -> dict[str, FoldChain]:
    """{consumer layer: its FoldChain} for every convolution whose input is a convolution's
    output that nothing else reads, through ReLU-like nodes only. Untraced models have none."""
    if not isinstance(module, fx.GraphModule):
        return {}
    chains = {}
    for node in module.graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), QuantLayer):
            continue
        if not isinstance(module.get_submodule(node.target).layer, nn.Conv2d):
            continue
        x, activations, upper = node.args[0], [], math.inf
        while isinstance(x, fx.Node) and len(x.users) == 1 and (clip := _relu_clip(module, x)) is not None:
            activations.append(x.name)
            upper = min(upper, clip)
            x = x.args[0]
        if (isinstance(x, fx.Node) and len(x.users) == 1 and x.op == "call_module"
                and isinstance(module.get_submodule(x.target), QuantLayer)
                and isinstance(module.get_submodule(x.target).layer, nn.Conv2d)):
            chains[node.target] = FoldChain(x.target, tuple(activations), upper)
    return chains


def grid_top(layer: QuantLayer) -> float:
    """The largest value the layer's input grid holds (inf when its input is not quantized)."""
    q = layer.input_quantizer
    if not q.enabled:
        return math.inf
    return float(((q.qmax - torch.round(q.zero_point.detach())) * q.step.detach()).max())


def foldable(chain: FoldChain, layer: QuantLayer, factor: torch.Tensor) -> bool:
    """Whether `factor` (the consumer's `smooth`) moves into the producer exactly: the clip,
    scaled per channel, lies at or above where the consumer's grid saturates."""
    if math.isinf(chain.upper):
        return True
    return grid_top(layer) <= chain.upper * float(factor.min()) * (1 + 1e-6)
