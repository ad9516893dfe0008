"""Weights used outside their layer's call, and products of two activations, made quantizable.

Models do not always call their layers: torchvision's Swin hands `self.qkv.weight` to a function
that calls F.linear, MaxViT and timm's transformers multiply queries by keys with `@`, einsum or
F.scaled_dot_product_attention. sub8 quantizes layers and operand sites that are modules, so
these calls are turned into module calls:

- In a traced graph, the nodes themselves: F.linear / F.conv2d on a parameter becomes a call of
  a Linear / Conv2d layer that holds that parameter; a product of two activations becomes a
  QuantProduct (or QuantScaledDotProduct) at `<module>.sub8_product<k>`; a call of a function
  the trace keeps whole (torch.fx.wrap) becomes an OpaqueCall module that runs it with (2).
- (2) At run time, where there is no node to rewrite (inside an OpaqueCall, and in a model
  prepared without a graph, in the modules whose own code makes such calls): a
  TorchFunctionMode that is active while that module runs sends each such call to its layer or
  to the module's k-th product site, in call order. The sites are created by one discovery pass
  at preparation.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..quant.layers import QuantInput, QuantLayer, float_mode
from ..quant.quantizer import Quantizer
from ..quant.products import QuantProduct, QuantScaledDotProduct
from .blocks import module_path

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
           operator.matmul}
SDPA = F.scaled_dot_product_attention
FUNCTIONAL_LAYERS = {F.linear: nn.Linear, F.conv2d: nn.Conv2d}


def _product_operands(func, args, kwargs):
    """(a, b, einsum equation or None) if this call multiplies two activations, else None."""
    if func is torch.Tensor.__rmatmul__ and len(args) == 2:
        a, b, eq = args[1], args[0], None
    elif func in MATMULS and len(args) == 2 and not kwargs:
        a, b, eq = args[0], args[1], None
    elif func is torch.einsum and args and isinstance(args[0], str):
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if len(ops) != 2:
            return None
        (a, b), eq = ops, args[0]
    else:
        return None
    if not all(isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 2 for t in (a, b)):
        return None
    return a, b, eq


def _conv_options(args, kwargs) -> dict:
    names = ("stride", "padding", "dilation", "groups")
    return dict(zip(names, args[3:]), **{k: v for k, v in kwargs.items() if k in names})


def _conv_matches(conv: nn.Conv2d, args, kwargs) -> bool:
    """Whether F.conv2d's options are the layer's own."""
    given = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **_conv_options(args, kwargs)}

    def norm(v):
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    return given["groups"] == conv.groups and all(norm(given[n]) == norm(getattr(conv, n))
                                                  for n in ("stride", "padding", "dilation"))


def _layer_for(func, weight: nn.Parameter, bias, args, kwargs) -> nn.Module:
    """A Linear / Conv2d that holds `weight` (and `bias`, a parameter or None) and computes what
    func(x, weight, bias, *options) does."""
    if func is F.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        options = _conv_options(args, kwargs)
        layer = nn.Conv2d(weight.shape[1] * options.get("groups", 1), weight.shape[0], tuple(weight.shape[2:]),
                          bias=False, **options)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


class FunctionalSites(nn.Module):
    """The product sites of one module whose own code makes the calls (in call order), the
    layers it owns for weights that its code hands to F.linear / F.conv2d (`layers`), and the
    paths (relative to that module) of layers elsewhere under it whose weights it uses."""

    def __init__(self, bits: int | None, symmetric: bool, paths=(), weight_names=None):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.products = nn.ModuleList()
        self.layers = nn.ModuleDict()
        self.paths = list(paths)
        self.weight_names = dict(weight_names or {})  # OpaqueCall: argument position -> parameter name
        self.discovering = True  # at preparation: create a site for each product met

    def layer_table(self, owner: nn.Module) -> dict[int, nn.Module]:
        found = list(self.layers.values()) + [owner.get_submodule(p) for p in self.paths]
        return {id(m.weight): m for m in found}


class Redirect(TorchFunctionMode):
    """While a module with FunctionalSites runs: its functional layer calls go to their layers,
    its products to its sites."""

    def __init__(self, sites: FunctionalSites, owner: nn.Module, args=()):
        super().__init__()
        self.sites, self.owner, self.k = sites, owner, 0
        self.layers = sites.layer_table(owner)
        if sites.discovering and sites.weight_names:  # OpaqueCall: its weight arguments
            self.new_weights = {id(args[i]): (name, args[i]) for i, name in sites.weight_names.items()
                                if i < len(args) and isinstance(args[i], nn.Parameter)}
        else:
            self.new_weights = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FUNCTIONAL_LAYERS and len(args) >= 2:
            layer = self.layers.get(id(args[1]))
            if layer is None:
                layer = self._new_layer(func, args, kwargs)
            if layer is not None:
                return self._call_layer(layer, func, args, kwargs)
        if self.sites.bits is None:  # products stay float (--no-attention, or float activations)
            return func(*args, **kwargs)
        if func is SDPA:
            return self._site(QuantScaledDotProduct, None)(*args, **kwargs)
        operands = _product_operands(func, args, kwargs)
        if operands is not None:
            a, b, eq = operands
            return self._site(QuantProduct, eq)(a, b)
        return func(*args, **kwargs)

    def _site(self, cls, equation):
        sites, k = self.sites, self.k
        self.k += 1
        if k < len(sites.products):
            return sites.products[k]
        if not sites.discovering:
            raise RuntimeError(f"{type(self.owner).__name__} made more matrix products than when sub8 prepared it "
                               f"({len(sites.products)}): its control flow depends on its input")
        site = cls(sites.bits, sites.symmetric) if cls is QuantScaledDotProduct else cls(sites.bits, sites.symmetric, equation)
        for q in site.modules():  # not calibrated yet: float until discovery ends
            if isinstance(q, Quantizer):
                q.bypass = True
        sites.products.append(site)
        return site

    def _new_layer(self, func, args, kwargs):
        """At discovery, a layer for a weight argument of an OpaqueCall."""
        found = self.new_weights.get(id(args[1]))
        if found is None:
            return None
        name, weight = found
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        layer = _layer_for(func, weight, bias if isinstance(bias, nn.Parameter) else None, args, kwargs)
        key = name.rsplit(".", 2)[-2] if "." in name else name
        while key in self.sites.layers:
            key += "_"
        self.sites.layers[key] = layer
        self.layers[id(weight)] = layer
        return layer

    @staticmethod
    def _call_layer(layer, func, args, kwargs):
        inner = getattr(layer, "layer", layer)  # a QuantLayer's wrapped layer, or the layer itself
        if func is F.conv2d and not _conv_matches(inner, args, kwargs):
            return func(*args, **kwargs)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if bias is inner.bias or not isinstance(layer, QuantLayer):
            return layer(args[0])
        layer.bias_override = (bias,)  # a bias the model derived (Swin V2 zeroes the keys' part), or none
        try:
            return layer(args[0])
        finally:
            layer.bias_override = None


class OpaqueCall(nn.Module):
    """A call of a function that the trace keeps whole, as a module: the function runs with its
    functional layer calls and products redirected to this module's sites."""

    def __init__(self, fn, bits: int | None, symmetric: bool, weight_names: dict[int, str]):
        super().__init__()
        self.fn = fn
        self.sub8_functional = FunctionalSites(bits, symmetric, weight_names=weight_names)

    def forward(self, *args, **kwargs):
        with Redirect(self.sub8_functional, self, args):
            return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def redirect_enter(module: nn.Module, args) -> None:
    """Forward pre-hook of a module whose own code makes functional calls (no graph)."""
    mode = Redirect(module.sub8_functional, module)
    module.__dict__.setdefault("_sub8_redirects", []).append(mode)
    mode.__enter__()


def redirect_exit(module: nn.Module, args, out) -> None:
    module.__dict__["_sub8_redirects"].pop().__exit__(None, None, None)


def _is_torch_function(target) -> bool:
    owner = getattr(target, "__module__", None) or ""
    return owner.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math") or \
        target in (getattr, operator.getitem)


def _fresh(gm: fx.GraphModule, path: str, stem: str) -> str:
    k = 0
    while True:
        target = f"{path}.{stem}{k}" if path else f"{stem}{k}"
        try:
            gm.get_submodule(target)
        except AttributeError:
            return target
        k += 1


def _param_of(gm: fx.GraphModule, node) -> nn.Parameter | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, nn.Parameter) else None
    return None


def rewrite_graph(gm: fx.GraphModule, bits: int | None, symmetric: bool) -> int:
    """Turn the traced graph's functional layer calls, activation products and opaque function
    calls into module calls (see the module docstring); returns how many nodes changed. Products
    get quantizers only with `bits` (None: only the functional layers and opaque calls change)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in FUNCTIONAL_LAYERS:
            changed += _functional_layer(gm, node)
        elif target is SDPA or target in MATMULS or target is torch.einsum:
            changed += _product(gm, node, bits, symmetric)
        elif not _is_torch_function(target) and callable(target):
            changed += _opaque(gm, node, bits, symmetric)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


def _functional_layer(gm, node) -> int:
    """F.linear(x, W, b) / F.conv2d(x, W, b, ...) on parameters -> a call of a layer holding them,
    in place of the module that held them where that module held nothing else."""
    args, kwargs = list(node.args), dict(node.kwargs)
    weight_node = args[1] if len(args) > 1 else kwargs.get("weight")
    bias_node = args[2] if len(args) > 2 else kwargs.get("bias")
    weight = _param_of(gm, weight_node)
    bias = _param_of(gm, bias_node) if bias_node is not None else None
    if weight is None or (bias_node is not None and bias is None) or len(weight_node.users) > 1:
        return 0
    if any(isinstance(v, fx.Node) for v in _conv_options(args, kwargs).values()):
        return 0
    layer = _layer_for(node.target, weight, bias, args, kwargs)
    owner = weight_node.target.rsplit(".", 1)[0] if "." in weight_node.target else ""
    holder = gm.get_submodule(owner) if owner else None
    alone = holder is not None and type(holder) is nn.Module and not list(holder.children()) and \
        {n for n, _ in holder.named_parameters()} | {n for n, _ in holder.named_buffers()} <= {"weight", "bias"}
    target = owner if alone else _fresh(gm, owner, "sub8_layer")
    gm.add_submodule(target, layer)
    _replace(gm, node, target, (args[0],), {})
    return 1


def _replace(gm, node, target: str, args, kwargs) -> None:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(target, tuple(args), dict(kwargs))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


VIEWS = {"transpose", "permute", "view", "reshape", "contiguous", "unsqueeze", "squeeze", "flatten", "expand"}


def _quantized_operand(gm, node: fx.Node) -> bool:
    """Whether `node` is a QuantInput's output, seen through views and (eval) dropout."""
    while True:
        if node.op == "call_module":
            return isinstance(gm.get_submodule(node.target), QuantInput)
        if (node.op == "call_method" and node.target in VIEWS) or \
                (node.op == "call_function" and node.target in (F.dropout, torch.transpose, torch.permute)):
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return False
            continue
        return False


def _product(gm, node, bits, symmetric) -> int:
    args, kwargs = node.args, node.kwargs
    if node.target is SDPA:
        if bits is None:
            return 0
        module, call_args, call_kwargs = QuantScaledDotProduct(bits, symmetric), args, kwargs
    else:
        if node.target is torch.einsum:
            ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            if len(ops) != 2 or not isinstance(args[0], str):
                return 0
            equation = args[0]
        else:
            ops, equation = list(args), None
            if len(ops) != 2 or kwargs:
                return 0
        if bits is None or any(not isinstance(o, fx.Node) or _param_of(gm, o) is not None for o in ops):
            return 0
        if all(_quantized_operand(gm, o) for o in ops):  # e.g. sub8's own explicit attention
            return 0
        module, call_args, call_kwargs = QuantProduct(bits, symmetric, equation), tuple(ops), {}
    target = _fresh(gm, module_path(node) or "", "sub8_product")
    gm.add_submodule(target, module)
    _replace(gm, node, target, call_args, call_kwargs)
    return 1


def _opaque(gm, node, bits, symmetric) -> int:
    """A call of a function the trace keeps whole -> an OpaqueCall, if it is handed parameters
    (its products are found when it runs, so every such call is wrapped)."""
    weight_names = {i: a.target for i, a in enumerate(node.args)
                    if (p := _param_of(gm, a)) is not None and p.dim() >= 2}
    target = _fresh(gm, module_path(node) or "", "sub8_call")
    gm.add_submodule(target, OpaqueCall(node.target, bits, symmetric, weight_names))
    _replace(gm, node, target, node.args, node.kwargs)
    return 1


@torch.no_grad()
def discover(module: nn.Module, example: torch.Tensor) -> int:
    """One float pass that creates the product sites (and an OpaqueCall's layers) in call order;
    then, in a traced graph, the parameters an OpaqueCall took over are read from its layers only.
    Returns how many product sites there are."""
    all_sites = [m for m in module.modules() if isinstance(m, FunctionalSites)]
    if not all_sites:
        return 0
    with float_mode(module):
        module(example)
    count = 0
    for sites in all_sites:
        sites.discovering = False
        count += len(sites.products)
        for q in sites.products.modules():
            if isinstance(q, Quantizer):
                q.bypass = False
    if isinstance(module, fx.GraphModule):
        _unwrap_idle_calls(module)
        _read_from_layers(module)
    return count


def _unwrap_idle_calls(gm: fx.GraphModule) -> None:
    """OpaqueCalls whose function used no weight and made no product (e.g. torchvision's
    stochastic depth) go back to plain calls: nothing of theirs is quantized, and the exporter
    and other graph passes see the function as traced."""
    idle = {name for name, m in gm.named_modules()
            if isinstance(m, OpaqueCall) and not len(m.sub8_functional.layers) and not len(m.sub8_functional.products)}
    if not idle:
        return
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in idle:
            fn = gm.get_submodule(node.target).fn
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(fn, node.args, node.kwargs)
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _read_from_layers(gm: fx.GraphModule) -> None:
    """Point the graph's reads of parameters that an OpaqueCall's layers now hold at those
    layers, so that each parameter lives in one place (the state dict, the artifact)."""
    held = {}
    for name, m in gm.named_modules():
        if isinstance(m, FunctionalSites):
            for key, layer in m.layers.items():
                for pname in ("weight", "bias"):
                    p = getattr(layer, pname, None)
                    if isinstance(p, nn.Parameter):
                        held[id(p)] = f"{name}.layers.{key}.{pname}"
    moved = []
    for node in gm.graph.nodes:
        p = _param_of(gm, node)
        if p is not None and id(p) in held and node.target != held[id(p)]:
            moved.append((node.target, p))
            node.target = held[id(p)]
    for old, p in moved:
        holder, pname = old.rsplit(".", 1) if "." in old else ("", old)
        holder_module = gm.get_submodule(holder)
        if type(holder_module) is nn.Module and getattr(holder_module, pname, None) is p:
            delattr(holder_module, pname)  # fx's stand-in for the layer: the parameter is now held once
    if moved:
        gm.delete_all_unused_submodules()
        gm.recompile()


def install_redirects(module: nn.Module, example: torch.Tensor, bits: int | None, symmetric: bool) -> int:
    """In a model without a graph: give each module whose own code hands a Linear/Conv2d weight
    to F.linear/F.conv2d, or multiplies two activations whose operands are not quantized yet,
    FunctionalSites and the hooks that redirect those calls while it runs; then discover its
    product sites. Returns how many modules got them."""
    from .coverage import observe_calls

    calls, owners = observe_calls(module, example)
    paths = {id(m): name for name, m in module.named_modules()}
    chosen: dict[int, tuple[nn.Module, set]] = {}
    for call in calls:
        where = call["where"]
        if where is None or isinstance(where, str):
            continue
        if not call["params"]:
            if bits is not None and not call["operands_quantized"] and call["func"] in (*MATMULS, SDPA, torch.einsum,
                                                                                         torch.Tensor.__rmatmul__):
                chosen.setdefault(id(where), (where, set()))
            continue
        if call["func"] not in FUNCTIONAL_LAYERS:
            continue
        for p in call["params"]:
            owner = owners[id(p)][1]
            if not isinstance(owner, (nn.Linear, nn.Conv2d)) or any(m is owner for m in call["stack"]):
                continue
            prefix, path = paths[id(where)], paths.get(id(owner), "")
            if prefix == "" or path.startswith(prefix + "."):
                relative = path[len(prefix) + 1:] if prefix else path
                chosen.setdefault(id(where), (where, set()))[1].add(relative)
    for where, relative in chosen.values():
        where.sub8_functional = FunctionalSites(bits, symmetric, paths=sorted(relative))
        where.register_forward_pre_hook(redirect_enter)
        where.register_forward_hook(redirect_exit, always_call=True)
    discover(module, example)
    return len(chosen)
