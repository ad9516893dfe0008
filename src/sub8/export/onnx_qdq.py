"""ONNX export: the quantized model as a QDQ graph that ONNX Runtime runs.

Each quantized layer becomes QuantizeLinear -> DequantizeLinear on its input and a
DequantizeLinear on its integer weight (per output channel), feeding a float Conv or Gemm; each
requantized tensor (a residual add's or the final pool's input, prepare/requantize.py) is one
QuantizeLinear -> DequantizeLinear that every consumer shares. ONNX Runtime fuses these into its
integer kernels (QLinearConv, QLinearAdd, QGemm). The graph is built from the prepared model's fx
graph, op by op; an op without a translation is refused by name. Storage per grid:
  - 8-bit activations: uint8/int8.
  - 8-bit weights, `weights="int8"` (the default, as ONNX Runtime's own quantizer stores them):
    signed codes as int8, run by the fast uint8 x int8 kernels. On x86 CPUs without VNNI (AVX2
    only) those kernels saturate 16-bit pair sums, which can give wrong outputs; `weights="uint8"`
    stores signed codes shifted by 128 (zero point 128), exact everywhere and about half as fast
    on a VNNI CPU (benchmarks/bench_onnx.py).
  - 4-bit weights: opset 21's int4/uint4.
  - any other grid, and 4-bit activations, in an 8-bit type; activations then get a Clip after
    DequantizeLinear that bounds them to the narrow grid (exact: clamping commutes with the
    monotone dequantization). ONNX Runtime 1.32 fails to load a uint4 QuantizeLinear after a
    Clip (ReLU6), which is why 4-bit activations are not stored as uint4.
Only a W8A8 layer with symmetric weights keeps its bias inside the Conv, where ONNX Runtime
quantizes it to int32 and fuses DequantizeLinear -> Conv -> QuantizeLinear into its integer
QLinearConv. Elsewhere the bias is added after the Conv in float, as sub8 adds it: the int32
rounding moves outputs by up to half of step_x * step_w (coarse at 4 bits), and per-channel
weight zero points send QLinearConv to a path about 50x slower than float.

ONNX's QuantizeLinear computes round(x / s) and sub8 round(x * (1/s)), and the runtimes sum
convolutions in different orders; codes differ where a value lies within a float rounding
error of a half-integer, so outputs agree to float noise amplified through the depth (as much
as sub8's own outputs move when the batch size changes).
"""

from __future__ import annotations

import json
import operator
import os
import warnings

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import Sub8Error
from ..prepare.channel_fold import fold_chains, foldable
from ..quant.layers import QuantInput, QuantLayer, quant_layers
from ..quant.quantizer import Quantizer
from ..report import REPORT, write_bytes_atomic, write_json
from .artifact import load

OPSET = 21
# ONNX element types (signed, unsigned) per bit-width: weights per storage choice, activations.
WEIGHT_STORAGE = {"int8": {8: ("INT8", "UINT8"), 4: ("INT4", "UINT4")},
                  "uint8": {8: ("UINT8", "UINT8"), 4: ("INT4", "UINT4")}}
INPUT_TYPES = {8: ("INT8", "UINT8")}


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise Sub8Error("ONNX export needs the 'export' extra: pip install 'sub8[export]'") from None
    return onnx, TensorProto, helper


def _w8a8_conv(layer: QuantLayer) -> bool:
    return isinstance(layer.layer, nn.Conv2d) and layer.w_bits == 8 and layer.a_bits == 8


def integer_conv(layer: QuantLayer) -> bool:
    """A layer that ONNX Runtime runs on its integer QLinearConv: a W8A8 conv with symmetric
    weights (per-channel zero points send QLinearConv to a path about 50x slower than float)."""
    return _w8a8_conv(layer) and layer.weight_quantizer.symmetric


class _Builder:
    def __init__(self, weights: str):
        if weights not in WEIGHT_STORAGE:
            raise Sub8Error(f"ONNX export: weights must be one of {', '.join(WEIGHT_STORAGE)}, not {weights!r}")
        self.weight_types = WEIGHT_STORAGE[weights]
        self.onnx, self.TP, self.helper = _onnx()
        self.nodes, self.inits, self.names = [], [], {}
        self.count = 0
        self.storage: dict[str, dict] = {}
        self.quantized: dict[tuple[str, int], str] = {}  # (tensor, id(quantizer)) -> its DQ output
        # input factors that move into the producing layer (prepare/channel_fold.py):
        self.output_factor: dict[str, np.ndarray] = {}  # producer -> its output channels' factor
        self.folded: set[str] = set()                   # consumers whose factor moved

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint.replace('.', '_')}_{self.count}"

    def const(self, hint: str, array: np.ndarray, dtype: str | None = None) -> str:
        name = self.fresh(hint)
        if dtype in ("INT4", "UINT4"):
            tensor = self.helper.make_tensor(name, getattr(self.TP, dtype), array.shape,
                                             array.reshape(-1).astype(np.int32).tolist())
        else:
            # (np.ascontiguousarray would turn a scalar into shape (1,): per-axis to ONNX)
            tensor = self.onnx.numpy_helper.from_array(np.array(array, order="C"), name)
        self.inits.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    # -- quantized layers ---------------------------------------------------------------------
    @staticmethod
    def grid_type(q: Quantizer, types: dict) -> tuple[str, int]:
        """The ONNX element type of q's codes and the offset added to the codes to store them."""
        kind = types.get(q.bits, ("INT8", "UINT8"))[0 if q.signed else 1]
        return kind, 128 if q.signed and kind == "UINT8" else 0

    @staticmethod
    def describe(q: Quantizer, types: dict) -> str | None:
        if not q.enabled:
            return None
        kind, offset = _Builder.grid_type(q, types)
        text = kind.lower() + (f" (signed codes + {offset})" if offset else "")
        return text if q.bits in types else f"{text} ({q.bits}-bit grid)"

    def codes(self, hint: str, values: np.ndarray, kind: str, offset: int) -> str:
        """Integer values (codes or zero points) as an initializer of ONNX type `kind`."""
        values = values.astype(np.int32) + offset
        return self.const(hint, values.astype(np.uint8 if kind.startswith("U") else np.int8), kind)

    def quantize_input(self, x: str, q: Quantizer, hint: str) -> str:
        """x through q's QuantizeLinear -> DequantizeLinear, once per tensor and quantizer: a
        residual add that shares a layer's input quantizer shares its QuantizeLinear, so that
        the producer's output has one quantized form and ONNX Runtime fuses it into QLinearConv."""
        key = (x, id(q))
        if key not in self.quantized:
            self.quantized[key] = self._quantize_input(x, q, hint)
        return self.quantized[key]

    def _quantize_input(self, x: str, q: Quantizer, hint: str) -> str:
        kind, offset = self.grid_type(q, INPUT_TYPES)
        step = q.step.detach().cpu().float().numpy().reshape(())
        zero = int(torch.round(q.zero_point.detach()).item())
        s = self.const(f"{hint}_scale", step)
        z = self.codes(f"{hint}_zero", np.array(zero), kind, offset)
        y = self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, z], f"{hint}_q"), s, z], f"{hint}_dq")
        if q.bits not in INPUT_TYPES:
            lo = np.float32((q.qmin - zero) * step)
            hi = np.float32((q.qmax - zero) * step)
            y = self.op("Clip", [y, self.const(f"{hint}_lo", lo), self.const(f"{hint}_hi", hi)], f"{hint}_grid")
        return y

    def weight(self, layer: QuantLayer, hint: str, transpose: bool, factor: np.ndarray | None = None) -> str:
        """The layer's weight, its output channel c times factor[c] where given (on a
        per-channel grid: the same codes, the step times the factor)."""
        w = layer.layer.weight.detach().cpu().float()
        q = layer.weight_quantizer
        if not q.enabled:
            if factor is not None:
                w = w * torch.from_numpy(factor).view(-1, *[1] * (w.dim() - 1))
            array = w.numpy().T if transpose else w.numpy()
            return self.const(f"{hint}_weight", array)
        kind, offset = self.grid_type(q, self.weight_types)
        with torch.no_grad():
            codes = q.codes(w).numpy()
        zero = torch.round(q.zero_point.detach()).cpu().numpy()
        c = self.codes(f"{hint}_wcodes", codes.T if transpose else codes, kind, offset)
        step = q.step.detach().cpu().float().numpy()
        if factor is not None:
            step = (step.reshape(-1) * factor).reshape(step.shape).astype(np.float32)
        s = self.const(f"{hint}_wscale", step)
        z = self.codes(f"{hint}_wzero", zero, kind, offset)
        return self.op("DequantizeLinear", [c, s, z], f"{hint}_wdq", axis=1 if transpose else 0)

    def quant_layer(self, name: str, layer: QuantLayer, x: str, rank: int | None = None) -> str:
        hint = name
        self.storage[name] = {"weight": self.describe(layer.weight_quantizer, self.weight_types),
                              "input": self.describe(layer.input_quantizer, INPUT_TYPES)}
        if layer.smooth is not None and name not in self.folded:  # the input's factor, before its quantizer
            smooth = layer.smooth.detach().cpu().float().numpy()
            if not isinstance(layer.layer, nn.Linear):
                smooth = smooth.reshape(-1, 1, 1)  # NCHW: broadcast over the positions
            x = self.op("Mul", [x, self.const(f"{hint}_smooth", smooth)], f"{hint}_smoothed")
        if layer.input_quantizer.enabled:
            x = self.quantize_input(x, layer.input_quantizer, f"{hint}_in")
        inner = layer.layer
        bias_array = inner.bias.detach().cpu().float().numpy()
        factor = self.output_factor.get(name)
        if factor is not None:
            bias_array = (bias_array * factor).astype(np.float32)
        if isinstance(inner, nn.Linear) and rank == 2:
            # Gemm, then the bias: ONNX Runtime fuses DQ -> Gemm into its integer QGemm with a
            # float output; a MatMul + Add would become a float Gemm that dequantizes its weight
            # on every call (a float bias inside the Gemm blocks the fusion too).
            y = self.op("Gemm", [x, self.weight(layer, hint, transpose=False)], f"{hint}_gemm", transB=1)
            return self.op("Add", [y, self.const(f"{hint}_bias", bias_array)], f"{hint}_out")
        if isinstance(inner, nn.Linear):
            y = self.op("MatMul", [x, self.weight(layer, hint, transpose=True)], f"{hint}_matmul")
            return self.op("Add", [y, self.const(f"{hint}_bias", bias_array)], f"{hint}_out")
        w = self.weight(layer, hint, transpose=False, factor=factor)
        attrs = _conv_attributes(name, inner)
        if integer_conv(layer):
            # ONNX Runtime turns this bias into int32 at step_x * step_w so that DQ -> Conv -> Q
            # fuses into its QLinearConv; at 8 bits that step is thousands of times finer than
            # an output step.
            return self.op("Conv", [x, w, self.const(f"{hint}_bias", bias_array)], f"{hint}_out", **attrs)
        y = self.op("Conv", [x, w], f"{hint}_conv", **attrs)
        bias = self.const(f"{hint}_bias", bias_array.reshape((-1,) + (1,) * (inner.weight.dim() - 2)))
        return self.op("Add", [y, bias], f"{hint}_out")


def _conv_attributes(name: str, conv: nn.Conv2d) -> dict:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise Sub8Error(f"ONNX export: layer {name!r} pads with {conv.padding_mode!r}/{conv.padding!r}; "
                        f"only explicit zero padding is supported")
    top, left = conv.padding
    bottom, right = conv.padding
    if type(conv) is not nn.Conv2d:  # e.g. a "same"-padding conv that pads before convolving
        pad = getattr(conv, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            pl, pr, pt, pb = pad.padding
            top, left, bottom, right = top + pt, left + pl, bottom + pb, right + pr
        elif not (isinstance(pad, nn.Identity) or type(pad).__name__ == "Identity"):
            raise Sub8Error(f"ONNX export: layer {name!r} is a {type(conv).__name__} with a forward of "
                            f"its own that sub8 cannot translate")
    return {"kernel_shape": list(conv.kernel_size), "strides": list(conv.stride),
            "dilations": list(conv.dilation), "group": conv.groups, "pads": [top, left, bottom, right]}


def _module_op(b: _Builder, name: str, m: nn.Module, x: str, rank: int | None) -> str:
    if isinstance(m, QuantLayer):
        return b.quant_layer(name, m, x, rank)
    if isinstance(m, QuantInput):  # a junction's quantizer of its own (prepare/requantize.py)
        m = m.input_quantizer
    if isinstance(m, Quantizer):  # (or a layer's input quantizer that a junction shares)
        return b.quantize_input(x, m, name) if m.enabled else x
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return x
    if isinstance(m, nn.ReLU):
        return b.op("Relu", [x], name)
    if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
        lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
        return b.op("Clip", [x, b.const(f"{name}_lo", np.float32(lo)), b.const(f"{name}_hi", np.float32(hi))], name)
    if isinstance(m, nn.Sigmoid):
        return b.op("Sigmoid", [x], name)
    if isinstance(m, nn.Hardswish):
        return b.op("HardSwish", [x], name)
    if isinstance(m, nn.Hardsigmoid):  # relu6(x + 3) / 6
        return b.op("HardSigmoid", [x], name, alpha=1 / 6, beta=0.5)
    if isinstance(m, nn.SiLU):
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{name}_sig")], name)
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return b.op("GlobalAveragePool", [x], name)
    if isinstance(m, nn.MaxPool2d):
        k, s, p, d = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                      for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        return b.op("MaxPool", [x], name, kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]],
                    dilations=list(d), ceil_mode=int(m.ceil_mode))
    raise Sub8Error(f"ONNX export: module {name!r} ({type(m).__name__}) has no ONNX translation in sub8")


def _function_op(b: _Builder, node: fx.Node, env: dict) -> str:
    target = node.target
    args = [fx.node.map_arg(a, lambda n: env[n.name]) for a in node.args]  # (also inside lists: torch.cat)
    name = node.name
    if target in (operator.add, torch.add) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return b.op("Add", args[:2], name)
    if target in (operator.mul, torch.mul) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return b.op("Mul", args[:2], name)
    if target in (torch.relu, torch.nn.functional.relu, "relu"):
        return b.op("Relu", [args[0]], name)
    if target in (torch.sigmoid, "sigmoid"):
        return b.op("Sigmoid", [args[0]], name)
    if target is torch.flatten or target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start == 1 and node.kwargs.get("end_dim", -1) == -1:
            return b.op("Flatten", [args[0]], name, axis=1)
    if target is torch.nn.functional.adaptive_avg_pool2d and node.args[1] in (1, (1, 1)):
        return b.op("GlobalAveragePool", [args[0]], name)
    if getattr(target, "__name__", None) == "stochastic_depth" and target.__module__.startswith("torchvision") \
            and not (node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)):
        return args[0]  # torchvision's stochastic depth outside training: the identity
    if target is torch.cat:
        return b.op("Concat", list(args[0] if isinstance(args[0], (list, tuple)) else [args[0]]), name,
                    axis=node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
    if target in ("view", "reshape"):
        dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
        shape = []
        for i, d in enumerate(dims):
            if isinstance(d, fx.Node) and d.target == "size" and d.args[1:] in ((0,), ()) and i == 0:
                shape.append(0)  # ONNX Reshape: 0 copies the input's dimension
            elif isinstance(d, int):
                shape.append(d)
            else:
                break
        else:
            return b.op("Reshape", [args[0], b.const(f"{name}_shape", np.array(shape, dtype=np.int64))], name)
    raise Sub8Error(f"ONNX export: operation {node.name!r} ({getattr(target, '__name__', target)}) has no "
                    f"ONNX translation in sub8")


def _fold_factors(module: fx.GraphModule, b: _Builder) -> set[str]:
    """Move each convolution's input factor (`smooth`) into the layer that produced its input
    where that is exact (prepare/channel_fold.py), so that both stay on integer kernels; returns
    the graph nodes of the clips between them, which become ReLUs."""
    layers = quant_layers(module)
    relus = set()
    for consumer, chain in fold_chains(module).items():
        layer = layers[consumer]
        if layer.smooth is None or not foldable(chain, layer, layer.smooth) or chain.producer in b.output_factor:
            continue
        b.output_factor[chain.producer] = layer.smooth.detach().cpu().float().numpy()
        b.folded.add(consumer)
        relus.update(chain.activations)
    return relus


def to_onnx(module: fx.GraphModule, input_shape: tuple[int, ...], weights: str = "int8") -> tuple[object, dict]:
    """The ONNX model (dynamic batch) and, per quantized layer, how its weight and input are
    stored; `weights`: the 8-bit weights' type (the module docstring says when to pick uint8)."""
    if not isinstance(module, fx.GraphModule):
        raise Sub8Error("ONNX export translates traced (torch.fx) models; this model was prepared without "
                        "a graph (report.json's capture says why), which the exporter does not handle yet")
    b = _Builder(weights)
    relus = _fold_factors(module, b)
    env, inputs, outputs = {}, [], []
    device = next(module.parameters()).device
    with torch.no_grad():
        # (the output, and each node's shape for its rank)
        example = ShapeProp(module).propagate(torch.zeros(input_shape, device=device))
    examples = list(example) if isinstance(example, (tuple, list)) else [example]
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = node.name
            shape = ["batch"] + list(input_shape[1:])
            inputs.append(b.helper.make_tensor_value_info(node.name, b.TP.FLOAT, shape))
        elif node.name in relus:  # a clip that the folded factor's consumer grid makes a ReLU
            env[node.name] = b.op("Relu", [env[node.args[0].name]], node.name)
        elif node.op == "call_module":
            meta = node.args[0].meta.get("tensor_meta")
            rank = len(meta.shape) if hasattr(meta, "shape") else None
            env[node.name] = _module_op(b, node.target, module.get_submodule(node.target), env[node.args[0].name], rank)
        elif node.op == "call_method" and node.target == "size":
            env[node.name] = None  # only consumed by view/reshape, which read the node itself
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _function_op(b, node, env)
        elif node.op == "output":
            result = node.args[0]
            for i, r in enumerate(result if isinstance(result, (tuple, list)) else [result]):
                out = f"output_{i}" if isinstance(result, (tuple, list)) else "output"
                b.nodes.append(b.helper.make_node("Identity", [env[r.name]], [out], name=out))
                shape = ["batch"] + list(examples[i].shape[1:])
                outputs.append(b.helper.make_tensor_value_info(out, b.TP.FLOAT, shape))
        else:
            raise Sub8Error(f"ONNX export: graph node {node.name!r} ({node.op}) is not supported")
    graph = b.helper.make_graph(b.nodes, "sub8", inputs, outputs, b.inits)
    model = b.helper.make_model(graph, opset_imports=[b.helper.make_opsetid("", OPSET)],
                                producer_name="sub8")
    b.onnx.checker.check_model(model)
    return model, b.storage


def export_onnx(run_dir: str, onnx_path: str, weights: str = "int8") -> dict:
    """Write the ONNX QDQ graph of the artifact in run_dir to onnx_path (atomically) and record
    how each layer is stored in run_dir/report.json's "export" entry."""
    qmodel = load(run_dir)
    header = qmodel.report["artifact"]
    model, storage = to_onnx(qmodel.module, tuple(header["input_shape"]), weights)
    write_bytes_atomic(onnx_path, model.SerializeToString())
    layers = qmodel.prepared.quant_layers().values()
    asymmetric = sum(1 for layer in layers if _w8a8_conv(layer) and not layer.weight_quantizer.symmetric)
    if asymmetric:
        warnings.warn(f"{asymmetric} W8A8 convolutions have per-channel weight zero points: ONNX Runtime runs them "
                      f"as float convolutions (quantize with --w-symmetric for its integer kernels)")
    record = {"path": os.path.abspath(onnx_path), "opset": OPSET, "bytes": os.path.getsize(onnx_path), "weights": weights,
              "layers": storage, "integer_kernel_layers": sum(map(integer_conv, layers))}
    report_path = os.path.join(run_dir, REPORT)
    if os.path.exists(report_path):
        with open(report_path) as fh:
            report = json.load(fh)
        report.setdefault("export", {})["onnx"] = record
        write_json(report_path, report)
    return record
