"""The quantized layer wrapper (quantizes its input activation and its weight), and the
quantized input of an operation that is not a layer (an attention product's operand)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import progress
from .quantizer import Quantizer
from .token_mask import real_head_tokens, real_token_pairs, real_tokens


class QuantLayer(nn.Module):
    """Wraps a Conv2d (any groups) or Linear, or a subclass of either with its own forward.

    The float weight and bias stay in `layer`; `weight_quantizer` is per output channel,
    `input_quantizer` per tensor. An optional `observer(layer, x)` sees each input before it is
    quantized (range calibration, bias correction); in a text model, only its real tokens.

    A Linear, or a pointwise or depthwise convolution, may carry `smooth` (SmoothQuant,
    methods/smooth_quant.py; channel equalization, methods/equalize.py): per input feature or
    channel, a factor the input is multiplied by before anything else sees it, its inverse folded
    into the weight slices that read it, so that the float output is unchanged while the input's
    grid fits every feature. "The input" (observers, caches, `compute`) is the smoothed one.
    """

    def __init__(self, layer: nn.Module, w_bits: int | None, a_bits: int | None,
                 w_symmetric: bool = False, a_symmetric: bool = False):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, not {type(layer).__name__}")
        if layer.bias is None:  # every wrapped layer gets a bias: bias correction/tuning move it
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        self.layer = layer
        self.weight_quantizer = Quantizer(w_bits, channels=layer.weight.shape[0], channel_axis=0,
                                          symmetric=w_symmetric)
        self.input_quantizer = Quantizer(a_bits, symmetric=a_symmetric)
        self.observer = None
        self.register_buffer("smooth", None)  # in the state dict only when set
        # (bias,) while a model's functional call hands its own bias (prepare/functional.py)
        self.bias_override = None
        self._weight_cache = None  # (key, tensor): the quantized weight, reused while nothing changes
        # A subclass (e.g. a "same"-padding conv) keeps its own forward; we only swap tensors.
        self._plain = type(layer) in (nn.Conv2d, nn.Linear)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: the wrapped layer's attributes (.weight, .bias,
        # .in_channels, ...) read through the wrapper, so a model that reads its own layers'
        # attributes still runs after wrapping.
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None or name.startswith("__"):
                raise
            return getattr(layer, name)

    @property
    def w_bits(self) -> int | None:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        return self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight. Without gradients (evaluation) it is computed once and
        reused until the weight, its grid or its bits change: the versions that every in-place
        update bumps (an optimizer step, load_state_dict, set_range) are part of the key."""
        weight, q = self.layer.weight, self.weight_quantizer
        if torch.is_grad_enabled():
            self._weight_cache = None
            return q(weight)
        # The cache holds the tensors themselves, so a replaced one cannot be mistaken for them.
        tensors = (weight, q.step, q.zero_point)
        key = (weight._version, q.step._version, q.zero_point._version, q.bits, q.signed, q.bypass, q.initialized)
        cached = self._weight_cache
        if cached is None or cached[0] != key or any(a is not b for a, b in zip(cached[1], tensors)):
            self._weight_cache = cached = (key, tensors, q(weight))
        return cached[2]

    def __getstate__(self):
        # Copies and pickles (executor work items) leave the cache behind.
        state = super().__getstate__()
        return {**state, "_weight_cache": None}

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The wrapped layer's own computation with the given weight and bias."""
        if not self._plain:
            tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            return torch.func.functional_call(self.layer, tensors, (x,))
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, bias)
        return self.layer._conv_forward(x, weight, bias)

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as its quantizer sees it: times `smooth` where the layer has it."""
        if self.smooth is None:
            return x
        factor = self.smooth.to(x.dtype)
        return x * (factor if isinstance(self.layer, nn.Linear) else factor.view(-1, 1, 1))

    def set_smooth(self, factor: torch.Tensor | None) -> None:
        """Multiply the input by `factor` (per input feature or channel) and the weight's
        matching slices by its inverse; None undoes a smoothing. The quantizers' ranges must be
        calibrated again. Only where `smoothable_kind` names the layer."""
        if smoothable_kind(self.layer) is None:
            raise TypeError("only the input of a Linear or of a pointwise or depthwise convolution is smoothed")
        old = torch.ones(smooth_features(self.layer)) if self.smooth is None else self.smooth
        new = torch.ones_like(old) if factor is None else factor.detach().to(old)
        with torch.no_grad():
            self.layer.weight.copy_(weight_over(self.layer, self.layer.weight, new / old))
        self.smooth = None if factor is None else new.to(self.layer.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state with `smooth` gives the layer the buffer to load it into; a state of this layer
        # without it (its weight is there) is an unsmoothed layer.
        if prefix + "smooth" in state_dict:
            self.smooth = torch.empty_like(state_dict[prefix + "smooth"])
        elif prefix + "layer.weight" in state_dict:
            self.smooth = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized output from an input already smoothed (what observers see)."""
        bias = self.layer.bias if self.bias_override is None else self.bias_override[0]
        return self.apply(self.input_quantizer(x), self.quantized_weight(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        if self.observer is not None:
            self.observer(self, real_tokens(x))
        return self.compute(x)

    def extra_repr(self) -> str:
        def b(v):
            return "float" if v is None else str(v)
        return f"w_bits={b(self.w_bits)}, a_bits={b(self.a_bits)}" + (", smoothed" if self.smooth is not None else "")


def smoothable_kind(layer: nn.Module) -> str | None:
    """'linear'; 'pointwise' (a 1x1 Conv2d with one group: a Linear over the channels);
    'depthwise' (a Conv2d with one group per input channel, each output channel reading one
    input channel: with the per-channel weight grid, scaling an input channel is free for the
    weight); else None: scaling another convolution's input channel would need per-position
    weight slices."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels and layer.groups > 1:
        return "depthwise"
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and tuple(layer.kernel_size) == (1, 1):
        return "pointwise"
    return None


def smooth_features(layer: nn.Module) -> int:
    """How many factors a smoothed input has: its features, or its channels."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def weight_over(layer: nn.Module, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`weight` with the slice that reads input feature (channel) c divided by factor[c]: the
    weight that keeps the output when the input is multiplied by `factor`."""
    factor = factor.to(weight)
    kind = smoothable_kind(layer)
    if kind == "linear":
        return weight / factor
    if kind == "pointwise":
        return weight / factor.view(1, -1, 1, 1)
    # depthwise: output channel o reads input channel o // multiplier
    return weight / factor.repeat_interleave(weight.shape[0] // factor.numel()).view(-1, 1, 1, 1)


def quant_layers(module: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLayer)}


class QuantInput(nn.Module):
    """A per-tensor quantizer on an operand that no layer owns (the queries, keys, values and
    softmax probabilities of attention). Like a QuantLayer's input it has an `input_quantizer`
    and an optional `observer(site, x)`, which sees only the entries of real tokens:
    `real(x)` picks them."""

    def __init__(self, bits: int | None, symmetric: bool, real):
        super().__init__()
        self.input_quantizer = Quantizer(bits, symmetric=symmetric)
        self.observer = None
        self.real = real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, self.real(x))
        return self.input_quantizer(x)


class QuantAttention(nn.Module):
    """The four quantized operands of one attention module's two matrix products: queries and
    keys (scores = q k^T), softmax probabilities and values (out = p v)."""

    def __init__(self, bits: int, symmetric: bool):
        super().__init__()
        self.query = QuantInput(bits, symmetric, real_head_tokens)
        self.key = QuantInput(bits, symmetric, real_head_tokens)
        self.probs = QuantInput(bits, symmetric, real_token_pairs)
        self.value = QuantInput(bits, symmetric, real_head_tokens)


def quant_operands(module: nn.Module) -> dict[str, QuantInput]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantInput)}


def quant_inputs(module: nn.Module) -> dict[str, QuantLayer | QuantInput]:
    """Every quantized activation site: each layer's input and each QuantInput, by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (QuantLayer, QuantInput))}


@contextlib.contextmanager
def float_mode(module: nn.Module, which=None):
    """Run `module` with every quantizer bypassed: the exact (BN-folded) float model; or only the
    quantizers whose names `which(name)` picks (where a model loses, group by group)."""
    quantizers = [m for name, m in module.named_modules()
                  if isinstance(m, Quantizer) and (which is None or which(name))]
    before = [q.bypass for q in quantizers]
    for q in quantizers:
        q.bypass = True
    try:
        yield module
    finally:
        for q, b in zip(quantizers, before):
            q.bypass = b


class StopForward(Exception):
    """Raised by an observer that has seen all it needs: the rest of the forward is skipped."""


@torch.no_grad()
def run_observed(module: nn.Module, observers: dict, data: torch.Tensor, batch_size: int,
                 float_model: bool = True, desc: str | None = None) -> None:
    """Run the model over `data` with `observers[name](site, x)` on the named layers (or
    QuantInput sites): the float model by default, else the model as quantized so far. With
    `desc`, a progress bar counts the samples."""
    layers = quant_inputs(module)
    device = next(module.parameters()).device
    for name, obs in observers.items():
        layers[name].observer = obs
    shown = progress.bar(len(data), desc, "sample")
    try:
        with float_mode(module) if float_model else contextlib.nullcontext():
            for i in range(0, len(data), batch_size):
                try:
                    module(data[i:i + batch_size].to(device))
                except StopForward:
                    pass
                shown.update(len(data[i:i + batch_size]))
    finally:
        for name in observers:
            layers[name].observer = None
        shown.close()


def module_state(module: nn.Module) -> dict:
    """A detached CPU copy of a module's state dict (checkpoints, allocation candidates)."""
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            for k, v in module.state_dict().items()}
