"""Uniform affine fake-quantization with a learnable step and zero point.

q(x) = s * (clamp(round(x * (1/s)) + round(z), qmin, qmax) - round(z))

(x times the reciprocal of s, as torch's fused fake-quant kernels compute it, so that the
fused per-tensor kernel and the op-by-op formula agree bit for bit.)

Rounding uses a straight-through estimator so that x, s and z all get gradients; the zero
point is stored as a float parameter and rounded (with STE) onto the integer grid each time.
`codes()` and `dequantize()` use the very same operations as `forward()`, so the integer codes,
step and zero point reproduce the fake-quantized tensor bit for bit (what export relies on).
"""

from __future__ import annotations

import torch
from torch import nn

from ..choices import FLOAT_BITS, parse_bits  # noqa: F401  (re-exported)


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Step, zero point and signedness that map [lo, hi] (widened to contain 0) onto the grid.

    Zero must be exactly representable (zero padding, ReLU outputs), hence the widening.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    tiny = 1e-12
    if symmetric:
        signed = bool((lo < 0).any())
        qmin, qmax = grid(bits, signed)
        step = torch.clamp(torch.maximum(-lo, hi) / qmax, min=tiny)
        zero = torch.zeros_like(step)
    else:
        signed = False
        qmin, qmax = grid(bits, signed)
        step = torch.clamp((hi - lo) / (qmax - qmin), min=tiny)
        zero = torch.clamp(torch.round(qmin - lo / step), qmin, qmax)
    return step, zero, signed


def fake_quantize(x, step, zero, qmin: int, qmax: int):
    """The quantize-dequantize round trip without gradients (range searches use it)."""
    return (torch.clamp(torch.round(x * torch.reciprocal(step)) + zero, qmin, qmax) - zero) * step


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return _RoundSTE.apply(x) if x.requires_grad else torch.round(x)


class _FakeQuantSTE(torch.autograd.Function):
    """s * (clamp(round(x * (1/s)) + round(z), qmin, qmax) - round(z)) with straight-through rounding.

    The same arithmetic as `codes()` then `dequantize()`, with the gradients written out (what
    autograd gives the op-by-op version, in a fraction of the memory passes: AdaQuant's hot
    loop is dominated by activation fake-quantization):
      d/dx = 1 inside the grid (qmin <= code <= qmax), 0 where clamped;
      d/ds = round(x/s) - x/s inside, q - round(z) where clamped, i.e. (y - x * inside) / s;
      d/dz = 0 inside, -s where clamped.
    `step` and `zero` come already shaped to broadcast against x. A per-tensor grid on CUDA
    runs torch's fused fake-quant kernel (one pass for output and mask; it multiplies by 1/s
    too); on CPU that kernel is scalar code, so there a per-tensor grid takes four in-place
    passes, clamping round(x/s) to [qmin - z, qmax - z] (the same values: integers add exactly),
    and its mask is a range of x, applied by hardtanh's fused backward (no mask tensor).
    """

    @staticmethod
    def forward(ctx, x, step, zero, qmin: int, qmax: int, overwrite_grad: bool = False):
        ctx.x_range = None
        ctx.overwrite_grad = overwrite_grad
        if x.is_cuda and step.numel() == 1 and x.dtype == torch.float32:
            y, inside = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, step.reshape(1).float(), torch.round(zero).reshape(1).to(torch.int32),
                torch.ones(1, dtype=torch.long, device=x.device), qmin, qmax)
        elif step.numel() == 1:
            s, z = step.item(), round(zero.item())
            y = (x * torch.reciprocal(step)).round_().clamp_(qmin - z, qmax - z).mul_(step)
            inside = None
            # round(x/s) is on the grid exactly for x/s within [qmin - z - 0.5, qmax - z + 0.5].
            ctx.x_range = ((qmin - z - 0.5) * s, (qmax - z + 0.5) * s)
        else:
            z = torch.round(zero)
            r = (x * torch.reciprocal(step)).round_().add_(z)
            inside = (r >= qmin).logical_and_(r <= qmax)
            y = r.clamp_(qmin, qmax).sub_(z).mul_(step)
        ctx.save_for_backward(x, y, inside, step)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, inside, step = ctx.saved_tensors
        need_x, need_step, need_zero = ctx.needs_input_grad[:3]
        grad_step = grad_zero = None
        per_tensor = step.numel() == 1
        if per_tensor:
            # The sums over `grad` first: then, where the caller allows it and x needs no
            # gradient (AdaQuant's cached inputs), the mask goes into `grad` in place (a fresh
            # tensor the size of x cost twice the masking pass itself on CPU).
            grad_dot_y = _dot(grad, y) if need_step else None
            grad_sum = grad.sum() if need_zero else None
        if ctx.x_range is not None:
            in_place = ctx.overwrite_grad and not need_x
            grad_x = torch.ops.aten.hardtanh_backward.grad_input(
                grad, x, *ctx.x_range, grad_input=grad if in_place else torch.empty_like(grad))
        else:
            grad_x = torch.where(inside, grad, 0.0)  # (a float * bool product is 2x slower on CPU)
        if per_tensor:
            if need_step:
                grad_step = (grad_dot_y - _dot(grad_x, x)).reshape(step.shape) / step
            if need_zero:
                grad_zero = (grad_x.sum() - grad_sum).reshape(step.shape) * step
        else:
            dims = [d for d in range(x.dim()) if step.shape[d] == 1]
            if need_step:
                grad_step = ((grad * y).sum(dims) - (grad_x * x).sum(dims)).reshape(step.shape) / step
            if need_zero:
                grad_zero = (grad_x.sum(dims) - grad.sum(dims)).reshape(step.shape) * step
        return (grad_x if need_x else None), grad_step, grad_zero, None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one pass without a temporary when both are dense in the same order."""
    if a.stride() == b.stride() and a.shape == b.shape:
        for fmt, order in ((torch.contiguous_format, None), (torch.channels_last, (0, 2, 3, 1))):
            if a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
                if order is not None:
                    a, b = a.permute(order), b.permute(order)
                return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


class Quantizer(nn.Module):
    """Fake-quantizer for one tensor: per tensor (channel_axis=None) or per channel.

    `bits=None` is a float pass-through. `symmetric=False` uses an unsigned grid with a zero
    point; `symmetric=True` fixes the zero point at 0 and uses a signed grid, or an unsigned
    one when the observed range is non-negative (after a ReLU).
    """

    def __init__(self, bits: int | None, channels: int = 1, channel_axis: int | None = None,
                 symmetric: bool = False):
        super().__init__()
        if channel_axis is None and channels != 1:
            raise ValueError("a per-tensor quantizer has one channel")
        self.bits = bits
        self.channel_axis = channel_axis
        self.symmetric = symmetric
        self.signed = False
        shape = (channels,) if channel_axis is not None else ()
        self.step = nn.Parameter(torch.ones(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape))
        self.initialized = False
        self.bypass = False  # temporarily act as float (see layers.float_mode)

    # -- grid -------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.bits is not None

    @property
    def qmin(self) -> int:
        return grid(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return grid(self.bits, self.signed)[1]

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_axis is None:
            return t
        shape = [1] * ndim
        shape[self.channel_axis] = -1
        return t.view(shape)

    # -- ranges -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set step and zero point so that [lo, hi] (widened to contain 0) maps onto the grid."""
        if self.bits is None:
            return
        shape = self.step.shape
        lo = torch.as_tensor(lo, dtype=torch.float32, device=self.step.device).reshape(shape)
        hi = torch.as_tensor(hi, dtype=torch.float32, device=self.step.device).reshape(shape)
        step, zero, self.signed = affine_params(lo, hi, self.bits, self.symmetric)
        self.step.copy_(step)
        self.zero_point.copy_(zero)
        self.initialized = True

    # -- quantization -----------------------------------------------------------------------
    def _step_zero(self, ndim: int):
        step = self._view(self.step, ndim)
        zero = round_ste(self._view(self.zero_point, ndim))
        return step, zero

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of x (as a float tensor holding integers in [qmin, qmax])."""
        step, zero = self._step_zero(x.dim())
        return torch.clamp(round_ste(x * torch.reciprocal(step)) + zero, self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        step, zero = self._step_zero(codes.dim())
        return (codes - zero) * step

    def fake_quant(self, x: torch.Tensor, step: torch.Tensor | None = None,
                   overwrite_grad: bool = False) -> torch.Tensor:
        """x rounded onto the grid and back (ignores `bypass`); `step` replaces the stored step
        (AdaQuant passes the one it optimizes). `overwrite_grad`: the output feeds only an op
        whose backward makes a fresh gradient (a conv, a linear), which the backward may then
        reuse as scratch memory."""
        if self.bits is None:
            return x
        if not self.initialized:
            raise RuntimeError("quantizer used before its range was calibrated")
        step = self.step if step is None else step
        # The same values as codes/dequantize (tested bit for bit) in fewer memory passes, with
        # fused gradients when they are needed.
        return _FakeQuantSTE.apply(x, self._view(step, x.dim()), self._view(self.zero_point, x.dim()),
                                   self.qmin, self.qmax, overwrite_grad)

    def fake_quant_rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` of a per-row (axis 0) quantized tensor, given those rows in float:
        each row on its own grid, as `fake_quant` of the whole tensor would put it."""
        if not self.initialized:
            raise RuntimeError("quantizer used before its range was calibrated")
        return _FakeQuantSTE.apply(rows, self.step[index].unsqueeze(-1), self.zero_point[index].unsqueeze(-1),
                                   self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bypass else self.fake_quant(x)

    # -- persistence: the grid travels with the state dict (weights_only-safe types) -------
    def get_extra_state(self):
        return {"bits": -1 if self.bits is None else self.bits, "signed": self.signed,
                "symmetric": self.symmetric, "initialized": self.initialized}

    def set_extra_state(self, state):
        self.bits = None if state["bits"] == -1 else int(state["bits"])
        self.signed = bool(state["signed"])
        self.symmetric = bool(state["symmetric"])
        self.initialized = bool(state["initialized"])

    def extra_repr(self) -> str:
        if self.bits is None:
            return "float"
        kind = "per-channel" if self.channel_axis is not None else "per-tensor"
        grid = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, {'symmetric' if self.symmetric else 'asymmetric'}, {grid}"
