"""The pieces of preparation (capture and fold a graph, list the layers, assign bits, wrap the
layers in quantizers); the model's adapter (sub8.adapters) decides which it needs."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import Sub8Error
from ..quant.embedding import QuantEmbedding, quant_embeddings
from ..quant.layers import QuantLayer, float_mode, quant_layers, quant_operands
from .attention import explicit_attention
from .coverage import census, check_strict
from .fold import fold_batchnorm
from .functional import discover, install_redirects, rewrite_graph
from .graph import QUANTIZABLE, LayerInfo, analyze, capture, count_macs, layer_kind
from .requantize import QuantTensor, junctions, requantize


@dataclass
class PreparedModel:
    """A BN-folded copy of the user's model whose Conv2d/Linear layers are QuantLayers."""

    module: nn.Module  # an fx.GraphModule, or the model itself when it does not trace
    layers: list[LayerInfo]
    float_params: int  # parameters of the user's (unfolded) float model
    # An untouched copy of `module` as prepared: steps that move the float weights (AdaQuant)
    # leave it alone, so later steps still see the exact (BN-folded) float model.
    reference: nn.Module
    attention_modules: int = 0  # attention modules whose matrix-product operands are quantized
    junctions: int = 0  # residual-add and pool inputs quantized (prepare/requantize.py)
    # How the model was captured: {"path": "fx" or "modules", "reason": why not fx, "lost": what
    # a model without a graph goes without}.
    capture: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # prepare/coverage.py: what stays float, and why

    def quant_layers(self) -> dict[str, QuantLayer]:
        return quant_layers(self.module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def other_quantizers(self) -> dict:
        """What is quantized besides the layers: embedding tables and attention operands."""
        tables = {name: {"bits": m.w_bits, "shape": list(m.layer.weight.shape)}
                  for name, m in quant_embeddings(self.module).items()}
        operands = quant_operands(self.module).values()
        bits = {m.input_quantizer.bits for m in operands if not isinstance(m, QuantTensor)}
        junction = [m for m in operands if isinstance(m, QuantTensor)]
        return {"embeddings": tables,
                "attention": {"modules": self.attention_modules, "bits": bits.pop() if len(bits) == 1 else None,
                              "operands": ["query", "key", "probs", "value"] if self.attention_modules else []},
                "junctions": {"requantized": self.junctions, "own_quantizers": len(junction),
                              "bits": junction[0].input_quantizer.bits if junction else None}}

    def sync_bits(self) -> None:
        """After a state was loaded: copy each layer's bits from its quantizers to the table, and
        its input smoothing (which leaves the float model as it was) to the float reference."""
        layers = self.quant_layers()
        for info in self.layers:
            info.w_bits, info.a_bits = layers[info.name].w_bits, layers[info.name].a_bits
        for name, ref in quant_layers(self.reference).items():
            smooth = layers[name].smooth
            if (smooth is None) != (ref.smooth is None) or (smooth is not None and not torch.equal(smooth, ref.smooth)):
                ref.set_smooth(smooth)


def assign_bits(layers: list[LayerInfo], config) -> None:
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


def lowest_bits(config) -> int | None:
    """The fewest bits any weight or activation of a layer is asked to have (None: all float)."""
    bits = [config.w_bits, config.a_bits, config.first_last_bits] + \
        [b for pair in config.layer_bits.values() for b in pair]
    bits = [b for b in bits if b is not None]
    return min(bits) if bits else None


def module_layers(module: nn.Module, example: torch.Tensor, skip=()) -> list[LayerInfo]:
    """The layer table of a model without a graph (or of the layers a graph does not reach,
    inside leaf modules): every Conv2d and Linear that runs on `example`, in the order they run,
    with no graph facts (producers, the activation after it)."""
    found = {name: m for name, m in module.named_modules() if isinstance(m, QUANTIZABLE) and name not in skip}
    macs = count_macs(module, found, example)  # in the order the layers ran
    return [LayerInfo(name=name, kind=layer_kind(found[name]), params=_layer_params(found[name]), macs=n)
            for name, n in macs.items()]


def _layer_params(m: nn.Module) -> int:
    return m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)


def _operand_bits(config) -> int | None:
    """The bits of attention's operands (None: its products stay float)."""
    return config.a_bits if config.quantize_attention else None


NO_GRAPH = ["BatchNorm stays unfolded after its convolution", "AdaQuant does not know which ReLU follows a layer",
            "residual adds' inputs are not requantized", "ONNX export (it translates the graph)"]


def prepare_traced(model: nn.Module, example: torch.Tensor, config) -> PreparedModel:
    """A BN-folded fx copy of `model` whose layers (from the graph: producers, following ReLU,
    MACs) are wrapped in quantizers. A model that torch.fx cannot trace is prepared without a
    graph instead (prepare_untraced), and `capture` says so and why."""
    module = copy.deepcopy(model).cpu().eval()
    attention = explicit_attention(module, _operand_bits(config), config.a_symmetric)
    try:
        gm = capture(module)
    except Sub8Error as exc:
        return _prepare_modules(module, example, _param_count(model), config, attention,
                                {"path": "modules", "reason": str(exc), "lost": NO_GRAPH})
    rewrite_graph(gm, _operand_bits(config), config.a_symmetric)
    discover(gm, example.cpu())
    folded = fold_batchnorm(gm)
    bits = junction_bits(config)
    with float_mode(gm):  # attention's operand quantizers are not calibrated yet
        layers = analyze(gm, example.cpu(), folded)
        inside_leaves = module_layers(gm, example.cpu(), skip={i.name for i in layers})
        if inside_leaves:  # layers inside modules the trace keeps whole: all in the order they run
            order = list(count_macs(gm, [i.name for i in layers + inside_leaves], example.cpu()))
            layers = sorted(layers + inside_leaves, key=lambda i: order.index(i.name))
        sites = junctions(gm, example.cpu()) if bits is not None else []
    return wrap_layers(gm, layers, _param_count(model), config, attention, example=example,
                       rewrite=lambda m: requantize(m, sites, bits, config.a_symmetric),
                       capture={"path": "fx", "reason": None, "lost": []})


def prepare_untraced(model: nn.Module, example: torch.Tensor, config, operands=None) -> PreparedModel:
    """A copy of `model` whose Conv2d and Linear layers are wrapped in place (no graph).
    `operands(module, example)`, if given, quantizes inputs that no layer owns and returns how
    many modules it changed (transformers' attention)."""
    module = copy.deepcopy(model).cpu().eval()
    attention = explicit_attention(module, _operand_bits(config), config.a_symmetric)
    if operands is not None:
        attention += operands(module, example.cpu())
    return _prepare_modules(module, example, _param_count(model), config, attention,
                            {"path": "modules", "reason": "the model declares sub8_traceable = False", "lost": NO_GRAPH})


def _prepare_modules(module, example, float_params, config, attention, capture_record) -> PreparedModel:
    install_redirects(module, example.cpu(), _operand_bits(config), config.a_symmetric)
    with float_mode(module):
        layers = module_layers(module, example.cpu())
    return wrap_layers(module, layers, float_params, config, attention, example=example, capture=capture_record)


def _param_count(model: nn.Module) -> int:
    """Parameters of the user's (unfolded) float model."""
    return sum(p.numel() for p in model.parameters())


def weight_symmetric(config, bits: int | None) -> bool:
    """A weight grid's symmetry: config.w_symmetric, or when it is None (auto) symmetric at 8
    bits and asymmetric below, where a zero point buys a grid level that a 4-bit grid cannot
    spare. At 8 bits the symmetric grid's mean shifts add up less through the network
    (MobileNetV2, weights alone at 8 bits: KL 0.052 symmetric, 0.135 asymmetric), and ONNX
    Runtime's integer kernels want it (benchmarks/bench_onnx.py)."""
    if config.w_symmetric is not None:
        return config.w_symmetric
    return bits is not None and bits >= 8


def junction_bits(config) -> int | None:
    """The bits of the junction tensors (residual adds' and the final pool's inputs,
    prepare/requantize.py), or None to leave them float: config.requantize, or when it is None
    (auto; a run resolves it in pipeline.auto_requantize) on when every layer is W8A8, where the
    export runs on integer kernels; with fewer bits anywhere it does not, and they only cost."""
    if config.requantize is False or config.a_bits is None:
        return None
    if config.requantize is None and lowest_bits(config) != 8:
        return None
    return config.a_bits


def wrap_layers(module: nn.Module, layers: list[LayerInfo], float_params: int, config,
                attention_modules: int = 0, rewrite=None, example: torch.Tensor | None = None,
                capture: dict | None = None) -> PreparedModel:
    """Wrap the table's layers (and embedding tables) in quantizers at their assigned bits;
    `rewrite(module)`, if given, then changes the graph around the wrapped layers. With
    `example`, one pass records what stays float (`coverage`); --strict makes that an error."""
    if not layers:
        raise Sub8Error("the model has no Conv2d or Linear layer to quantize")
    assign_bits(layers, config)
    for info in layers:
        wrapper = QuantLayer(module.get_submodule(info.name), info.w_bits, info.a_bits,
                             w_symmetric=weight_symmetric(config, info.w_bits), a_symmetric=config.a_symmetric)
        module.set_submodule(info.name, wrapper)
    if config.embedding_bits is not None:
        for name in [n for n, m in module.named_modules() if isinstance(m, nn.Embedding)]:
            module.set_submodule(name, QuantEmbedding(module.get_submodule(name), config.embedding_bits,
                                                      symmetric=weight_symmetric(config, config.embedding_bits)))
    junctions = rewrite(module) if rewrite is not None else 0
    if isinstance(module, fx.GraphModule):
        module.recompile()
    coverage = census(module.eval(), example.cpu(), _operand_bits(config) is None) if example is not None else {}
    if coverage and getattr(config, "strict", False):
        check_strict(coverage)
    module = module.to(config.device).eval()
    return PreparedModel(module=module, layers=layers, float_params=float_params, reference=copy.deepcopy(module),
                         attention_modules=attention_modules, junctions=junctions, capture=capture or {},
                         coverage=coverage)


@dataclass
class QuantizedModel:
    """What a run returns: the prepared (fake-quantized) model and its report.json record."""
    prepared: PreparedModel
    report: dict = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return self.prepared.module

    def __call__(self, x):
        return self.prepared.module(x)
