"""Graph capture with torch.fx and the layer table: what feeds each layer, what follows it.

"Followed by a ReLU" is read from the graph: a layer counts as followed by a ReLU only when a
ReLU/ReLU6 is its *only* consumer (a conv that also feeds a residual add is not).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import Sub8Error
from ..quant.layers import QuantInput

QUANTIZABLE = (nn.Conv2d, nn.Linear)
INPUT = "<input>"


class _Tracer(fx.Tracer):
    # Conv2d/Linear subclasses (e.g. "same"-padding convs) stay whole, so they can be wrapped;
    # so do operand quantizers (attention's), whose state a trace must not bake in.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANTIZABLE, QuantInput)) or super().is_leaf_module(m, qualname)


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace `model` (in eval mode) into a GraphModule that shares its submodules."""
    model.eval()
    try:
        graph = _Tracer().trace(model, concrete_args=_defaults(model) or None)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise Sub8Error(f"could not capture the model's graph with torch.fx "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        _drop_fixed_input(graph, node)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _defaults(model: nn.Module) -> dict:
    """The forward's optional arguments after the input, at their defaults: sub8 calls a model
    with one tensor, so these are constants (timm's ViT: attn_mask=None), and the graph keeps a
    single input."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    simple = (type(None), bool, int, float, str)
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not inspect.Parameter.empty
            and isinstance(p.default, simple)}


def _drop_fixed_input(graph: fx.Graph, node: fx.Node) -> None:
    """Remove an optional argument that the trace fixed at its default, with the checks fx made
    of it (that it is None; that it equals the default, and the assertion on that)."""
    checks, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        name = getattr(user.target, "__name__", "")
        if user.op != "call_function" or not (name.startswith("_assert") or user.target is operator.eq):
            return  # the graph really reads it: keep the input
        checks.append(user)
        stack.extend(user.users)
    for user in sorted(set(checks), key=lambda n: -list(graph.nodes).index(n)):
        graph.erase_node(user)
    graph.erase_node(node)


@dataclass
class LayerInfo:
    name: str
    kind: str                 # conv, depthwise, grouped or linear
    params: int               # weight + bias elements
    macs: int                 # multiply-accumulates per sample at the model's input size
    inputs_from: list[str] = field(default_factory=list)  # nearest quantizable producers
    followed_by: str | None = None  # "relu", "relu6" or None, from the graph
    bn_folded: bool = False
    w_bits: int | None = None
    a_bits: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    return "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' or 'relu6' if `node` applies exactly that elementwise function, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0:
            return "relu6"
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _flat_nodes(args) -> list[fx.Node]:
    out = []
    fx.node.map_arg(args, out.append)
    return out


def _shape_only(node: fx.Node) -> bool:
    """x.size() / x.shape / x.dim(): a dependency on shape, not on values."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")


def quantizable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """call_module nodes of Conv2d/Linear, in graph (topological) order."""
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QUANTIZABLE)]


def count_macs(module: nn.Module, names, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of the named Conv2d/Linear layers, on one example batch
    (layers that do not run are absent)."""
    macs: dict[str, int] = {}

    def hook(name):
        def fn(m, inputs, out):
            per_out = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_features
            macs[name] = macs.get(name, 0) + out.numel() // out.shape[0] * per_out
        return fn

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return macs


def analyze(gm: fx.GraphModule, example: torch.Tensor, folded: list[str]) -> list[LayerInfo]:
    """The layer table of a float (BN-folded) GraphModule; `example` is one input batch."""
    nodes = quantizable_nodes(gm)
    names = {n.target for n in nodes}
    macs = count_macs(gm, names, example)

    def producers(node: fx.Node) -> list[str]:
        seen, found, stack = set(), [], _flat_nodes(node.args)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module" and n.target in names:
                found.append(n.target)
            elif n.op == "placeholder":
                found.append(INPUT)
            elif n.op != "get_attr" and not _shape_only(n):
                stack.extend(_flat_nodes(n.args))
                stack.extend(_flat_nodes(n.kwargs))
        return sorted(set(found))

    table = []
    for node in nodes:
        m = gm.get_submodule(node.target)
        users = list(node.users)
        follow = _is_activation(gm, users[0]) if len(users) == 1 else None
        params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        table.append(LayerInfo(name=node.target, kind=layer_kind(m), params=params,
                               macs=macs.get(node.target, 0), inputs_from=producers(node),
                               followed_by=follow, bn_folded=node.target in folded))
    return table


