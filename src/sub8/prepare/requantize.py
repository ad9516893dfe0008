"""Requantized junctions: the tensors between layers that a runtime would otherwise keep in float.

A layer's input is quantized, but a tensor that also flows in float into a residual add (the
skip connections of MobileNet and ResNet, and the convolution that ends each block) or into the
final global pool cannot stay in integers: ONNX Runtime then runs the convolution that produced
it in float and dequantizes its weights on every call, which made the W8A8 export slower than
the float model. With both inputs of every such add and the input of the pool quantized, every
convolution's output is requantized once, and the adds run on integers (QLinearConv,
QLinearAdd).

A tensor that a quantized layer also reads is quantized by that layer's own input quantizer (the
same module: the same grid, calibrated and learned once, one QuantizeLinear in the export); any
other gets a QuantTensor of its own at the model's activation bits.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..quant.layers import QuantInput, QuantLayer


class QuantTensor(QuantInput):
    """The quantizer of a junction tensor (an input of a residual add or of the final pool)
    that no layer reads."""

    def __init__(self, bits: int | None, symmetric: bool):
        super().__init__(bits, symmetric, real=_all)


def _all(x: torch.Tensor) -> torch.Tensor:
    return x


def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    return (node.op == "call_function" and node.target is F.adaptive_avg_pool2d
            and len(node.args) > 1 and node.args[1] in (1, (1, 1)))


def junctions(gm: fx.GraphModule, example: torch.Tensor) -> list[tuple[fx.Node, int]]:
    """(node, argument index) of every junction input: both inputs of each add of two activations
    of the output's shape (not `x + 1`, not a broadcast parameter such as a position embedding,
    found by running `example` through the float graph), and the input of each global average pool."""
    ShapeProp(gm).propagate(example)
    found = []
    for node in gm.graph.nodes:
        if _is_global_pool(gm, node) and isinstance(node.args[0], fx.Node):
            found.append((node, 0))
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        out = node.meta.get("tensor_meta")
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not hasattr(out, "shape"):
            continue
        if all(n.op != "get_attr" and getattr(n.meta.get("tensor_meta"), "shape", None) == out.shape for n in (a, b)):
            found += [(node, 0), (node, 1)]
    return found


def requantize(gm: fx.GraphModule, sites: list[tuple[fx.Node, int]], bits: int | None, symmetric: bool) -> int:
    """Route each junction input through a quantizer (after the layers are wrapped, so that a
    wrapped layer reading the same tensor lends its own). Returns how many inputs it quantized."""
    routed = 0
    for node, i in sites:
        tensor = node.args[i]
        target = _existing_quantizer(gm, tensor)
        if target is None:
            if bits is None:
                continue
            target = f"requant_{node.name}_{i}"
            gm.add_submodule(target, QuantTensor(bits, symmetric))
        with gm.graph.inserting_before(node):
            quantized = gm.graph.call_module(target, (tensor,))
        node.args = node.args[:i] + (quantized,) + node.args[i + 1:]
        routed += 1
    gm.graph.lint()
    return routed


def _existing_quantizer(gm: fx.GraphModule, tensor: fx.Node) -> str | None:
    """The quantizer (its module path) that `tensor` already has: the input quantizer of a
    quantized layer that reads it, else a QuantTensor given to it for another junction."""
    users = [u for u in tensor.users if u.op == "call_module" and u.args[:1] == (tensor,)]
    for user in users:
        m = gm.get_submodule(user.target)
        if isinstance(m, QuantLayer) and m.input_quantizer.enabled:
            return f"{user.target}.input_quantizer"
    for user in users:
        if isinstance(gm.get_submodule(user.target), QuantTensor):
            return user.target
    return None
