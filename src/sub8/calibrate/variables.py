"""What a reconstruction unit fits (calibrate/reconstruct.py): quantizer steps in log space,
weights free as AdaQuant's or rounded by a learned choice as AdaRound's, and the stand-ins that
compute a layer or a quantizer site with them.

Learned rounding: a weight ends on one of its two neighbouring grid points, floor(W/s) + h(V)
with h a stretched sigmoid clipped to [0, 1]; after a warm-up a regularizer whose exponent
anneals from 20 to 2 pushes every h to 0 or 1, and the end rounds h at 1/2.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..quant.layers import QuantInput, QuantLayer
from ..quant.quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1     # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1
WARMUP = 0.2                # share of the iterations before the rounding regularizer starts
BETA = (20.0, 2.0)          # the regularizer's exponent, annealed from the first to the second


def random_mask(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """1.0 with probability p per element, else 0.0 (float32), in x's memory layout (a
    channels-last mask keeps the mixed tensor channels-last, and the convolutions after it on
    their fast path). p counts in steps of 2^-16: each element compares 16 random bits, drawn
    three to a 64-bit word; the generator's draw per element (uniform_) took longer than the
    unit's convolutions on CPU."""
    n = x.numel()
    words = torch.empty(-(-n // 3), dtype=torch.int64, device=x.device).random_(0, 2 ** 48, generator=generator)
    chunks = words.view(torch.int16).view(-1, 4)  # each 16-bit chunk uniform on [-32768, 32767]
    chunks = chunks[:, :3] if sys.byteorder == "little" else chunks[:, 1:]  # (the top 16 bits are 0)
    mask = torch.empty(chunks.shape, dtype=torch.float32, device=x.device)
    torch.lt(chunks, round(p * 65536) - 32768, out=mask)
    flat = mask.view(-1)[:n]
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return flat.as_strided(x.shape, x.stride()) if dense else flat.view(x.shape)


class _Mix(torch.autograd.Function):
    """`a` where the 0/1 mask is 1, `b` elsewhere: one lerp (exact at weights 0 and 1) and, in
    the backward pass, one product; torch.where's CPU kernel took about twice as long each way."""

    @staticmethod
    def forward(ctx, a, b, mask):
        ctx.save_for_backward(mask)
        return torch.lerp(b, a, mask)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]  # (called only when one of them is)
        grad_a = grad * mask
        return (grad_a if need_a else None), (grad - grad_a if need_b else None), None


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`a` where `mask` (random_mask's) is 1, `b` elsewhere."""
    return _Mix.apply(a, b, mask)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def beta_at(it: int, iters: int) -> float | None:
    """The regularizer's exponent at iteration `it`, None during the warm-up."""
    t = it / max(iters, 1)
    if t < WARMUP:
        return None
    rel = (t - WARMUP) / (1 - WARMUP)
    return BETA[1] + (BETA[0] - BETA[1]) * max(0.0, 1.0 - rel)


class StepVariable:
    """A quantizer's step, in log space (a relative rate, as AdaQuant's), its zero point when it
    has one, and QDrop's dropping while the unit is fitted."""

    def __init__(self, q: Quantizer, lr: float):
        self.q = q
        self.step0 = q.step.detach().clone()
        self.u = torch.zeros_like(q.step)
        self.params, self.lrs, self.zero_points = [self.u], [lr], []
        if not q.symmetric:
            self.params.append(q.zero_point)
            self.lrs.append(lr)
            self.zero_points.append((q.zero_point, q.qmin, q.qmax))
        self.drop = 0.0
        self.generator: torch.Generator | None = None

    def step(self) -> torch.Tensor:
        return self.step0 * torch.exp(self.u)

    def __call__(self, x: torch.Tensor, overwrite_grad: bool = False) -> torch.Tensor:
        # (with dropping, the quantized value feeds the mix, not only the layer)
        out = self.q.fake_quant(x, self.step(), overwrite_grad=overwrite_grad and not self.drop)
        if self.drop:
            out = mix(x, out, random_mask(x, self.drop, self.generator))
        return out

    @torch.no_grad()
    def finish(self) -> None:
        self.q.step.copy_(self.step())


# A free weight moves in units of its channel's grid step; in a layer whose weights have more than
# 4 bits and more bits than its input, in units of a 4-bit grid's step over the same range. There
# the weights must absorb the coarse input's rounding, and in units of their own fine step the
# rate that suits 4-bit weights barely moved them: MobileNetV2 W8A4 (blocks, QDrop, 100
# iterations, seed 0) kept 0.676 of the confident top-1s (KL 0.921), fewer than W4A4 (0.737),
# and 0.758 (KL 0.670) in 4-bit units (benchmarks/results/reconstruct_w8a4.json). Every layer
# in 4-bit units cost W4A4 (0.683, KL 0.846): its 8-bit first and last layers, whose inputs
# have 8 bits, then moved as far too.
UNIT_BITS = 4


def weight_unit(layer: QuantLayer) -> torch.Tensor:
    """Per output channel, the unit in which a free weight of `layer` moves from now on (a new
    tensor, shaped to broadcast over its weight): its grid step, times (2^b - 1) / (2^4 - 1)
    where its b > 4 weight bits are more than its input's."""
    q, input_bits = layer.weight_quantizer, layer.input_quantizer.bits
    coarse_input = input_bits is not None and input_bits < q.bits
    scale = max(1.0, (2 ** q.bits - 1) / (2 ** UNIT_BITS - 1)) if coarse_input else 1.0
    return (q.step.detach() * scale).view(-1, *[1] * (layer.layer.weight.dim() - 1))


class FreeWeights:
    """AdaQuant's weights: free, in units of weight_unit."""

    def __init__(self, layer: QuantLayer, lr: float, steps: StepVariable):
        w = layer.layer.weight
        self.layer, self.steps = layer, steps
        self.grid = weight_unit(layer)
        self.weight = (w.detach() / self.grid).clone()
        self.params, self.lrs = [self.weight], [lr]

    def __call__(self) -> torch.Tensor:
        return self.steps.q.fake_quant(self.weight * self.grid, self.steps.step())

    @torch.no_grad()
    def finish(self) -> None:
        self.layer.layer.weight.copy_(self.weight * self.grid)


class LearnedRounding:
    """AdaRound's weights: each code is floor(W/s0) + h(V), V learned; s0 the initial step."""

    def __init__(self, layer: QuantLayer, lr: float, steps: StepVariable):
        w = layer.layer.weight.detach()
        q = steps.q
        self.layer, self.steps = layer, steps
        self.shape = (-1, *[1] * (w.dim() - 1))
        scaled = w / steps.step0.view(self.shape)
        self.base = torch.floor(scaled)
        rest = scaled - self.base  # h(V) starts at it: the float weight
        self.v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.zero = torch.round(q.zero_point.detach()).view(self.shape)
        self.qmin, self.qmax = q.qmin, q.qmax
        self.params, self.lrs = [self.v], [lr]

    def codes(self, hard: bool = False) -> torch.Tensor:
        h = (self.v >= 0).to(self.base.dtype) if hard else rectified_sigmoid(self.v)
        return torch.clamp(self.base + h + self.zero, self.qmin, self.qmax)

    def __call__(self) -> torch.Tensor:
        return (self.codes() - self.zero) * self.steps.step().view(self.shape)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def finish(self) -> None:
        # A float weight on the chosen grid point: the layer's quantizer gives back the code.
        self.layer.layer.weight.copy_((self.codes(hard=True) - self.zero) * self.steps.step().view(self.shape))


class VariableLayer(nn.Module):
    """A QuantLayer's computation with the variables being fitted."""

    def __init__(self, layer: QuantLayer, weights, steps: StepVariable | None):
        super().__init__()
        self.__dict__.update(wrapped=layer, weights=weights, steps=steps)  # not submodules

    def forward(self, x):
        x = self.wrapped.smoothed(x)
        if self.steps is not None:
            x = self.steps(x, overwrite_grad=True)
        w = self.weights() if self.weights is not None else self.wrapped.quantized_weight()
        return self.wrapped.apply(x, w, self.wrapped.layer.bias)


class VariableSite(nn.Module):
    """A quantizer outside a layer (a junction, an attention operand) with its step being fitted."""

    def __init__(self, steps: StepVariable):
        super().__init__()
        self.__dict__["steps"] = steps

    def forward(self, x):
        return self.steps(x)


class UnitVariables:
    """The variables of one unit: a stand-in per quantized module (by name), each step once
    (a quantizer shared by two sites is one variable), and the weights."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.stand_ins: dict[str, nn.Module] = {}
        self._steps: dict[int, StepVariable] = {}
        self.weights: list = []

    def step_of(self, q: Quantizer, lr: float) -> StepVariable | None:
        if not q.enabled:
            return None
        if id(q) not in self._steps:
            self._steps[id(q)] = StepVariable(q, lr)
        return self._steps[id(q)]

    def add(self, name: str, m: nn.Module) -> None:
        """A stand-in for `m` if it is a quantized layer or a quantizer site."""
        cfg = self.cfg
        if isinstance(m, QuantLayer):
            ws = self.step_of(m.weight_quantizer, cfg.lr_weight_quant)
            kind, lr = (LearnedRounding, cfg.lr_rounding) if cfg.rounding == "learned" else (FreeWeights, cfg.lr_weight)
            w = kind(m, lr, ws) if ws else None
            self.stand_ins[name] = VariableLayer(m, w, self.step_of(m.input_quantizer, cfg.lr_input_quant))
            self.weights += [w] if w else []
        elif isinstance(m, (QuantInput, Quantizer)):
            s = self.step_of(m.input_quantizer if isinstance(m, QuantInput) else m, self.cfg.lr_input_quant)
            if s is not None:
                self.stand_ins[name] = VariableSite(s)

    @property
    def steps(self) -> list[StepVariable]:
        return list(self._steps.values())

    @property
    def biases(self) -> list:
        """(weights, bias, bias rate) per layer with quantized weights."""
        return [(s.weights, s.wrapped.layer.bias, self.cfg.lr_bias) for s in self.stand_ins.values()
                if isinstance(s, VariableLayer) and s.weights is not None]
