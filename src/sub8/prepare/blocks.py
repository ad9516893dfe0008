"""Reconstruction units: the parts of a model that block reconstruction (BRECQ, QDrop) fits whole.

A block is a module of the model's own design that holds two or more quantized layers and is
built more than once: an inverted residual, a ResNet bottleneck or basic block, a transformer
layer. On each layer's path from the root, the outermost such module is its block, so a block
ends after its residual add. Containers (Sequential, ModuleList, ModuleDict) are not blocks, nor
is a module built once (a whole backbone): neither is a unit of the design. In a traced model a
block must also read its inputs and hand one tensor on (a region of the graph with one output).
Every other layer is a unit of its own, with the ReLU/ReLU6 that follows it, as layer-wise
AdaQuant fits it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Unit:
    name: str                  # the block's module path, or the layer's name
    kind: str                  # "block" or "layer"
    layers: list[str]          # its quantized layers, in graph order
    # traced models: its graph nodes, the outside nodes it reads and the node it hands on
    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "layers": list(self.layers)}


def _is_container(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, CONTAINERS)


def _stack(node: fx.Node) -> list[tuple[str, type]]:
    """(module path, class) of the modules whose forward made `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, cls) for path, cls in stack.values() if path]


def module_path(node: fx.Node) -> str | None:
    """The innermost module whose forward made `node` (None: the model's own forward)."""
    stack = _stack(node)
    return stack[-1][0] if stack else None


def find_units(module: nn.Module, layers: list, block: bool = True) -> list[Unit]:
    """The reconstruction units of a prepared model, in graph order. `layers`: the prepared
    layer table (prepare.LayerInfo); `block=False`: every layer a unit of its own."""
    if isinstance(module, fx.GraphModule):
        return _traced_units(module, layers, block)
    return _module_units(module, layers, block)


def _traced_units(gm: fx.GraphModule, layers: list, block: bool) -> list[Unit]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_target = {n.target: n for n in nodes if n.op == "call_module"}
    info = {i.name: i for i in layers}

    def node_of(name: str) -> fx.Node:
        """A layer's graph node: its own, or (inside a module the trace keeps whole) the
        module's call."""
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in by_target:
                return by_target[".".join(parts[:k])]
        raise KeyError(name)

    layer_nodes = list(dict.fromkeys(node_of(i.name) for i in layers))
    held_by = {}
    for i in layers:
        held_by.setdefault(node_of(i.name), []).append(i.name)

    classes: dict[str, type] = {}
    members: dict[str, set] = {}
    for n in nodes:
        for path, cls in _stack(n):
            classes[path] = cls
            members.setdefault(path, set()).add(n)
    built = Counter(classes.values())

    def region(path: str) -> set:
        """The module's nodes, with the unattributed ones (quantizers inserted after tracing)
        whose users all lie inside it."""
        inside = set(members[path])
        for n in reversed(nodes):
            if n not in inside and n.op not in ("placeholder", "output") and not _stack(n) \
                    and n.users and all(u in inside for u in n.users):
                inside.add(n)
        return inside

    def leaving(inside: set) -> list:
        return [n for n in inside if any(u not in inside for u in n.users)]

    units, taken = [], set()
    for node in layer_nodes:
        if node in taken:
            continue
        chosen = None
        if block:
            for path, cls in _stack(node):
                if _is_container(cls) or built[cls] < 2 or path == node.target:
                    continue
                inside = region(path)
                held = [n for n in layer_nodes if n in inside]
                if sum(len(held_by[n]) for n in held) >= 2 and len(leaving(inside)) == 1:
                    chosen = (path, inside, held)
                    break
        if chosen is None:
            inside = {node}
            users = list(node.users)
            own = info.get(node.target)
            if own is not None and own.followed_by is not None and len(users) == 1:
                inside.add(users[0])
            chosen = (node.target, inside, [node])
        path, inside, held = chosen
        ordered = sorted(inside, key=order.get)
        reads = sorted({a for n in ordered for a in n.all_input_nodes if a not in inside}, key=order.get)
        out = leaving(inside)
        names = [name for n in held for name in held_by[n]]
        units.append(Unit(path, "block" if len(names) > 1 else "layer", names,
                          [n.name for n in ordered], [a.name for a in reads],
                          (out[0] if len(out) == 1 else ordered[-1]).name))
        taken.update(held)
    units.sort(key=lambda u: min(order[node_of(t)] for t in u.layers))
    return units


def _module_units(module: nn.Module, layers: list, block: bool) -> list[Unit]:
    """Units of a model without a graph (text models): blocks from the module tree alone."""
    names = [i.name for i in layers]
    built = Counter(type(m) for _, m in module.named_modules())
    units, taken = [], set()
    for name in names:
        if name in taken:
            continue
        chosen = None
        parts = name.split(".")
        for k in range(1, len(parts)) if block else ():
            path = ".".join(parts[:k])
            m = module.get_submodule(path)
            if _is_container(type(m)) or built[type(m)] < 2:
                continue
            held = [n for n in names if n.startswith(path + ".")]
            if len(held) >= 2:
                chosen = (path, held)
                break
        path, held = chosen or (name, [name])
        units.append(Unit(path, "block" if len(held) > 1 else "layer", held))
        taken.update(held)
    return units
