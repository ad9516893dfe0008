"""What a prepared model quantizes and what it leaves in float.

One forward pass of the float (bypassed) prepared model runs under a TorchFunctionMode that sees
every call of torch's functions. A call is weight-bearing when it multiplies by a parameter of
two or more dimensions (F.linear, F.conv*, matmul, fused attention or RNN kernels, embedding
lookups); it is quantized when a sub8 wrapper of that parameter's layer (QuantLayer,
QuantEmbedding) is running at the time and has bits. A matrix product of two activations
(attention's q k^T and p v, also inside F.scaled_dot_product_attention) is quantized when both
operands come from quantized operand sites (QuantInput). Everything else is listed with its
share of the model's weight parameters and multiply-accumulates and the reason it stayed float,
so nothing is left in float without saying so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from ..errors import Sub8Error
from ..quant.embedding import QuantEmbedding
from ..quant.layers import QuantInput, QuantLayer, float_mode
from ..quant.quantizer import Quantizer
from .blocks import module_path

# Products of two tensors: when neither is a parameter, an attention-style product of activations.
PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
            torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm, torch.baddbmm, torch.addmm, torch.einsum}
FUSED_ATTENTION = {F.scaled_dot_product_attention}
NO_MACS = {F.embedding, F.embedding_bag, torch.embedding}
CONVS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
# Fused kernels (attention, RNNs, transformer layers) are known by their names.
WEIGHT_WORDS = ("linear", "conv", "matmul", "mm", "einsum", "attention", "lstm", "gru", "rnn",
                "transformer", "embedding", "bilinear")


def _name(func) -> str:
    """A torch function as a user writes it: F.linear, torch.matmul, Tensor.matmul."""
    owner = getattr(func, "__module__", None) or ""
    short = getattr(func, "__name__", repr(func))
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{short}"
    if owner.startswith(("torch.nn.functional", "torch._C._nn")) or getattr(F, short, None) is func:
        return f"F.{short}"
    return f"torch.{short}"


def _weight_bearing(func) -> bool:
    if func in PRODUCTS or func in CONVS or func in NO_MACS or func is F.linear:
        return True
    name = getattr(func, "__name__", "").lower()
    return any(w in name for w in WEIGHT_WORDS)


def _flat(tree) -> list:
    out = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        else:
            out.append(x)
    walk(tree)
    return out


class _Census(TorchFunctionMode):
    """Records weight-bearing calls and activation products during one forward pass."""

    def __init__(self, weights: dict, batch: int):
        super().__init__()
        self.weights = weights        # id(parameter) -> its name, for parameters of 2+ dims
        self.batch = batch
        self.stack: list[nn.Module] = []
        self.site_outputs: list[torch.Tensor] = []  # kept alive, so their storages stay unique
        self.site_storages: set[int] = set()
        self.calls: list[dict] = []
        self.root: nn.Module | None = None
        self.node_path: str | None = None  # while a traced graph runs: its node's module path

    def quantized_operand(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.site_storages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _weight_bearing(func):
            return out
        tensors = [t for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor)]
        params = [t for t in tensors if id(t) in self.weights]
        first = tensors[0] if tensors else None
        result = _flat(out)[0] if isinstance(out, (tuple, list)) else out
        where = self.stack[-1] if self.stack else None
        if (where is None or where is self.root) and self.node_path is not None:
            where = self.node_path  # a traced graph's own code: the module whose forward made the node
        if params:
            self.calls.append({"func": func, "params": params, "stack": list(self.stack), "where": where,
                               "macs": self.macs(func, params, first, result)})
        elif func in PRODUCTS or func in FUSED_ATTENTION:
            operands = tensors[:3] if func in FUSED_ATTENTION else tensors[-2:]
            if len(operands) >= 2 and all(t.dim() >= 2 for t in operands):
                self.calls.append({"func": func, "params": [], "stack": list(self.stack), "where": where,
                                   "operands_quantized": all(self.quantized_operand(t) for t in operands),
                                   "macs": self.product_macs(func, operands, result)})
        return out

    def macs(self, func, params, first, result) -> int:
        if func in NO_MACS or not isinstance(result, torch.Tensor):
            return 0
        w = params[0]
        if func in (F.conv1d, F.conv2d, F.conv3d):  # each output element: one weight filter
            return result.numel() // self.batch * w[0].numel()
        if func in CONVS:  # transposed: each input element is spread by one weight slice
            return first.numel() // self.batch * w[0].numel()
        if func is F.linear or func in PRODUCTS:
            return result.numel() // self.batch * (w.numel() // result.shape[-1] if result.shape[-1] else 0)
        # a fused kernel (attention, RNN): each weight element once per position of its input
        if first is None or first.dim() == 0:
            return 0
        positions = first.numel() // self.batch // max(first.shape[-1], 1)
        return positions * sum(p.numel() for p in params)

    def product_macs(self, func, operands, result) -> int:
        if func in FUSED_ATTENTION:  # q k^T and p v: batch x heads x L x S x d each
            q, k = operands[0], operands[1]
            return 2 * q.numel() // self.batch * k.shape[-2]
        if not isinstance(result, torch.Tensor):
            return 0
        return result.numel() // self.batch * operands[0].shape[-1]


class _Located(fx.Interpreter):
    """Runs a traced graph node by node, telling the census which module each node came from."""

    def __init__(self, gm: fx.GraphModule, mode: _Census):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node):
        self.mode.node_path = module_path(n)
        return super().run_node(n)


def _owners(module: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(parameter) -> (its name, the module that holds it, the parameter's own name there),
    for every parameter of 2+ dimensions outside the quantizers."""
    found = {}
    for path, m in module.named_modules():
        if isinstance(m, Quantizer):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in found:
                found[id(p)] = (f"{path}.{pname}" if path else pname, m, pname)
    return found


def _wrapper_of(stack: list[nn.Module], owner: nn.Module):
    """The sub8 wrapper on the call stack that wraps `owner`, if any."""
    for m in reversed(stack):
        if isinstance(m, (QuantLayer, QuantEmbedding)) and m.layer is owner:
            return m
    return None


def _float_reason(func, owner: nn.Module, wrapped_elsewhere: bool) -> str:
    if wrapped_elsewhere:
        return (f"its layer's weight is used outside the layer's own call ({_name(func)}), "
                f"where sub8's wrapper does not see it")
    if isinstance(owner, nn.MultiheadAttention):
        from .attention import rewritable
        return rewritable(owner) or "nn.MultiheadAttention called in a way sub8 does not rewrite"
    if isinstance(owner, nn.Embedding):
        return "embedding tables kept in float (--embedding-bits float)"
    if isinstance(owner, (nn.Conv2d, nn.Linear)):
        return f"{type(owner).__name__} that the preparation did not wrap"
    kind = type(owner).__name__
    if type(owner) is nn.Module:  # what a traced graph keeps of a layer it only read parameters of
        return f"a layer's weight read as a tensor and passed to {_name(func)}, not a call of the layer"
    if isinstance(owner, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                          nn.RNNBase, nn.Bilinear)):
        return f"nn.{kind} is not a layer kind sub8 quantizes (Conv2d and Linear are)"
    return f"a weight of {kind} used directly by {_name(func)}, not through a Conv2d or Linear layer"


@torch.no_grad()
def observe_calls(module: nn.Module, example: torch.Tensor) -> tuple[list[dict], dict]:
    """The weight-bearing calls and activation products of one float pass over `example`, and
    the owners of the parameters they use (id -> (name, module, parameter name))."""
    owners = _owners(module)
    mode = _Census({k: v[0] for k, v in owners.items()}, max(len(example), 1))

    def before(m, args):
        mode.stack.append(m)

    def after(m, args, out):
        if mode.stack and mode.stack[-1] is m:
            mode.stack.pop()
        if isinstance(m, QuantInput) and m.input_quantizer.bits is not None and isinstance(out, torch.Tensor):
            mode.site_outputs.append(out)
            mode.site_storages.add(out.untyped_storage().data_ptr())

    handles = [module_hooks.register_module_forward_pre_hook(before),
               module_hooks.register_module_forward_hook(after, always_call=True)]
    mode.root = module
    try:
        with float_mode(module), mode:
            if isinstance(module, fx.GraphModule):
                _Located(module, mode).run(example)
            else:
                module(example)
    finally:
        for h in handles:
            h.remove()
    return mode.calls, owners


def census(module: nn.Module, example: torch.Tensor, products_float: bool = False) -> dict:
    """The coverage record of a prepared model (report.json's `coverage`), from one forward
    pass over `example` with every quantizer bypassed. `products_float`: the run asked for
    attention's products in float (--no-attention, float activations)."""
    calls, owners = observe_calls(module, example)
    quantizer_params = {id(p) for m in module.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    total_params = sum(p.numel() for p in module.parameters() if id(p) not in quantizer_params)
    wrappers = {id(m.layer): m for m in module.modules() if isinstance(m, (QuantLayer, QuantEmbedding))}
    paths = {id(m): name or "(model)" for name, m in module.named_modules()}
    quantized_macs = float_macs = 0
    quantized_weights, used, entries = set(), set(), {}
    products = {"quantized": 0, "float": 0, "quantized_macs": 0, "float_macs": 0}
    for call in calls:
        where = call["where"] if isinstance(call["where"], str) else paths.get(id(call["where"]), "(model)")
        op = _name(call["func"])
        if not call["params"]:
            key = "quantized" if call["operands_quantized"] else "float"
            products[key] += 1
            products[f"{key}_macs"] += call["macs"]
            if key == "float":
                reason = "attention products kept in float (--no-attention or float activations)" if products_float \
                    else "a matrix product of two activations (attention) whose operands are not quantized"
                entry = entries.setdefault((where, op, None), {
                    "op": op, "where": where, "weights": [], "params": 0, "macs": 0, "chosen": products_float,
                    "reason": reason})
                entry["macs"] += call["macs"]
            continue
        all_quantized = True
        for p in call["params"]:
            used.add(id(p))
            name, owner, _ = owners[id(p)]
            wrapper = _wrapper_of(call["stack"], owner)
            if wrapper is not None and wrapper.w_bits is not None:
                quantized_weights.add(id(p))
                continue
            all_quantized = False
            if wrapper is not None:
                reason = "kept in float by the bit assignment (first/last layer bits or --layer-bits)"
            else:
                reason = _float_reason(call["func"], owner, id(owner) in wrappers)
            entry = entries.setdefault((where, op, name), {"op": op, "where": where, "weights": [name],
                                                           "params": p.numel(), "macs": 0, "reason": reason,
                                                           "chosen": wrapper is not None})
            entry["macs"] += call["macs"] // len(call["params"])
        if all_quantized:
            quantized_macs += call["macs"]
        else:
            float_macs += call["macs"]
    quantized_params = sum(p.numel() for p in module.parameters() if id(p) in quantized_weights)
    all_macs = quantized_macs + float_macs + products["quantized_macs"] + products["float_macs"]
    done_macs = quantized_macs + products["quantized_macs"]
    float_list = sorted(entries.values(), key=lambda e: (-e["macs"], -e["params"]))
    for e in float_list:
        e["params_share"] = e["params"] / total_params if total_params else 0.0
        e["macs_share"] = e["macs"] / all_macs if all_macs else 0.0
    # 2+-dimensional parameters that no weight-bearing call used: position embeddings, class
    # tokens (added or concatenated, not multiplied), or weights this input never reached.
    other = sorted(owners[i][0] for i in owners if i not in used)
    return {"params": {"total": total_params, "quantized": quantized_params,
                       "share": quantized_params / total_params if total_params else 0.0},
            "macs": {"total": all_macs, "quantized": done_macs,
                     "share": done_macs / all_macs if all_macs else 1.0},
            "products": products,
            "float": float_list,
            "other_weights": other}


def leftovers(coverage: dict) -> list[dict]:
    """The float entries that nobody asked for (not the layers a bit assignment keeps float)."""
    return [e for e in coverage["float"] if not e.get("chosen")]


def check_strict(coverage: dict) -> None:
    """--strict: anything left in float that was not asked for is an error that names it."""
    left = leftovers(coverage)
    if left:
        lines = "; ".join(f"{e['where']} {e['op']}{' ' + e['weights'][0] if e['weights'] else ''} ({e['reason']})"
                          for e in left[:5])
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise Sub8Error(f"--strict: {len(left)} weight-bearing operation(s) would stay in float: {lines}{more} "
                        f"(report.json's coverage lists them all; without --strict they run in float)")
