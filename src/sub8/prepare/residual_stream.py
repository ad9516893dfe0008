"""Residual streams: the tensors that residual adds join, whose channels can be rescaled as one.

In a MobileNet-style network the blocks of a stage add their (linear) projection's output to the
stage's running tensor, and the next blocks' 1x1 expansions read it. Its channels' ranges differ
widely, and its grid cannot be changed by one consumer alone (the add reads the same tensor
through the same quantizer: prepare/requantize.py). But every tensor of the stream is a sum of
projection outputs, so multiplying channel c by f_c in every producing convolution (its weight's
row c and its bias) scales the whole stream, and dividing the weight slices of every reader that
takes channel c by f_c keeps the float model. Nothing is left to fold at export: the weights
themselves change.

A stream qualifies only when every tensor in it is a convolution's output or an add of two of
its tensors, and every other reader is a pointwise or depthwise convolution (a ReLU after the
add, a pool, or a 3x3 convolution reading it would need the factor undone): ResNet's streams,
with a ReLU after each add, do not.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..quant.layers import QuantInput, QuantLayer, smoothable_kind
from ..quant.quantizer import Quantizer


@dataclass(frozen=True)
class Stream:
    producers: tuple[str, ...]  # the convolutions whose outputs enter it: their output channels take f
    consumers: tuple[str, ...]  # the pointwise and depthwise convolutions that read it: input channels 1 / f
    sites: tuple[str, ...]      # the quantized sites that see its tensors: the consumers and junction quantizers


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args))


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The quantizer a graph node calls (a junction's own, or a layer's input quantizer that the
    junction shares), else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, (Quantizer, QuantInput)) and not isinstance(m, QuantLayer) else None


def _layer(gm: fx.GraphModule, node: fx.Node) -> QuantLayer | None:
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, QuantLayer) else None


def residual_streams(module: nn.Module) -> list[Stream]:
    """Every qualifying residual stream of a traced prepared model, in graph order."""
    if not isinstance(module, fx.GraphModule):
        return []

    def unquantized(node: fx.Node) -> fx.Node:
        while _quantizer(module, node) is not None:
            node = node.args[0]
        return node

    parent: dict[fx.Node, fx.Node] = {}

    def root(n: fx.Node) -> fx.Node:
        while parent.setdefault(n, n) is not n:
            n = parent[n]
        return n

    for node in module.graph.nodes:
        if _is_add(node):
            for arg in node.args:
                parent[root(unquantized(arg))] = root(node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in module.graph.nodes:  # graph order
        if node in parent:
            groups.setdefault(root(node), []).append(node)
    return [s for members in groups.values() if (s := _stream(module, members)) is not None]


def _stream(gm: fx.GraphModule, members: list[fx.Node]) -> Stream | None:
    inside = set(members)
    producers, consumers, sites = [], [], []
    for t in members:
        if not _is_add(t):
            layer = _layer(gm, t)
            if layer is None or not isinstance(layer.layer, nn.Conv2d):
                return None
            producers.append(t.target)
        for user in t.users:
            if user in inside:
                continue
            q = _quantizer(gm, user)
            if q is not None and all(u in inside for u in user.users):  # a junction's quantizer
                if isinstance(q, QuantInput):
                    sites.append(user.target)
                continue
            layer = _layer(gm, user)
            if (layer is None or user.args[0] is not t or layer.smooth is not None
                    or smoothable_kind(layer.layer) not in ("pointwise", "depthwise")):
                return None
            consumers.append(user.target)
    if not producers or not consumers:
        return None
    return Stream(tuple(producers), tuple(consumers), tuple(consumers) + tuple(sites))
