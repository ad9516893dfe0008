"""GPTQ (Frantar et al., 2022): weights rounded column by column, each column's rounding error
spread over the columns not yet rounded through the inverse Hessian of the layer's inputs.

For a layer with weight W (rows: output channels; columns: the inputs one output sees: in
features, or in-channels x kernel taps of one conv group) and inputs X, the output error
||W X - Q X||^2 has Hessian H = 2 X X^T. Rounding column j to q_j, then moving the columns
after it by -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,>j keeps the error as small as the remaining
columns can. The upper Cholesky factor of H^-1 holds every [H^-1 of the remaining columns] row
that this needs, and updates are applied lazily a block of columns at a time. H is dampened by
`damp` times its mean diagonal. No gradient descent: one Cholesky per layer (per conv group).

The grid (per-channel step and zero point) comes from the range calibration before it
(`--steps ranges,gptq`). Inputs: sequential (the default) takes them from the model quantized
so far, activations quantized, so each layer corrects what came before; parallel takes the
float model's (then layers are independent and GPTQ may come before bit allocation).
Sequential GPTQ runs the model once over the whole calibration set, layer by layer (an fx graph
node by node; a model without a graph in one forward whose layers are GPTQ'd as it reaches
them), so it holds the activations of all calibration samples at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import progress
from ..errors import Sub8Error
from ..quant.layers import QuantLayer, run_observed
from ..registry import register, setting

GPTQ_MODES = ("sequential", "parallel")


@dataclass
class GPTQConfig:
    mode: str = setting("sequential", flag="--gptq-mode", choices=GPTQ_MODES,
                        help="GPTQ's inputs: the quantized model's (sequential) or the float model's (parallel)")
    block_size: int = setting(128, flag="--gptq-block-size", help="GPTQ: columns per lazy update block")
    damp: float = setting(0.01, flag="--gptq-damp", help="GPTQ: dampening, a share of the Hessian's mean diagonal")

    def __post_init__(self):
        if self.mode not in GPTQ_MODES:
            raise Sub8Error(f"gptq.mode must be one of {', '.join(GPTQ_MODES)}, got {self.mode!r}")
        if self.block_size < 1:
            raise Sub8Error(f"gptq.block_size must be at least 1, got {self.block_size}")
        if not 0.0 <= self.damp < 1.0:
            raise Sub8Error(f"gptq.damp must be in [0, 1), got {self.damp}")


def quantize_columns(w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest of weight columns on their rows' grids (all float64, same shapes)."""
    return (torch.clamp(torch.round(w / step) + zero, qmin, qmax) - zero) * step


def gptq(weight: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, qmin: int,
         qmax: int, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ of G independent groups at once: weight G x O x d, hessian G x d x d, step and zero
    G x O (per row). Returns the quantized weight (float64, on the grid)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    step, zero = step.double()[..., None], zero.double()[..., None]
    d = w.shape[-1]
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0  # inputs that are always zero: their weights do not matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += damp * diag.mean(-1, keepdim=True)
    # The upper Cholesky factor of H^-1: row j holds [H^-1 of columns j..]_j,j.. / sqrt(its diagonal).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[..., i]
            qcol = quantize_columns(col, step[..., 0], zero[..., 0], qmin, qmax)
            q[..., i1 + i] = qcol
            err = (col - qcol) / h1[:, i, i][:, None]
            w1[..., i:] -= err[..., None] * h1[:, i, i:][:, None, :]
            err1[..., i] = err
        w[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return q


def _padding_of(layer: QuantLayer):
    """What a conv does to its input before the convolution proper (None: nothing but zeros)."""
    conv = layer.layer
    if layer._plain and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return None
    if hasattr(conv, "static_padding"):  # TensorFlow-style "same" convs pad in their forward
        return conv.static_padding
    raise Sub8Error(f"GPTQ does not support {type(conv).__name__} (padding {conv.padding!r}, "
                    f"mode {conv.padding_mode!r})")


class HessianAccumulator:
    """Sums X X^T of a layer's (input-quantized) inputs, per conv group: G x d x d."""

    def __init__(self, layer: QuantLayer):
        self.layer = layer
        self.sum = None
        self.count = 0
        if isinstance(layer.layer, nn.Conv2d):
            self.pad = _padding_of(layer)

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        layer = self.layer
        x = layer.input_quantizer(x.float())
        if isinstance(layer.layer, nn.Linear):
            cols = x.reshape(-1, x.shape[-1]).T[None]           # 1 x d x n
        else:
            conv = layer.layer
            if self.pad is not None:
                x = self.pad(x)
            cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # N x C*k x L
            g = conv.groups
            cols = cols.reshape(x.shape[0], g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, -1,
                                                                                             x.shape[0] * cols.shape[-1])
        part = (cols @ cols.transpose(1, 2)).double()
        self.sum = part if self.sum is None else self.sum + part
        self.count += cols.shape[-1]

    def hessian(self) -> torch.Tensor:
        return 2 * self.sum / max(self.count, 1)


@torch.no_grad()
def gptq_layer(layer: QuantLayer, hessian: torch.Tensor, cfg: GPTQConfig) -> dict:
    """Replace the layer's float weight by its GPTQ rounding, or by round-to-nearest where that
    is better on the same objective (GPTQ's greedy column order can end a hair worse on a fine
    8-bit grid: 8.7065e-6 against 8.7053e-6 on a test layer); the record: the output error proxy
    tr((W - Q) H (W - Q)^T) / rows of both, and which was kept."""
    wq = layer.weight_quantizer
    w = layer.layer.weight
    g = hessian.shape[0]
    rows = w.shape[0] // g
    weight = w.detach().reshape(g, rows, -1).double().cpu()
    step = wq.step.detach().reshape(g, rows).double().cpu()
    zero = torch.round(wq.zero_point.detach()).reshape(g, rows).double().cpu()
    q = gptq(weight, hessian.cpu(), step, zero, wq.qmin, wq.qmax, cfg.block_size, cfg.damp)
    rtn = quantize_columns(weight, step[..., None], zero[..., None], wq.qmin, wq.qmax)

    def error(e):
        return (torch.einsum("god,gde,goe->", e, hessian.cpu(), e) / w.shape[0]).item()

    errors = {"rtn_error": error(weight - rtn), "gptq_error": error(weight - q)}
    kept = "gptq" if errors["gptq_error"] <= errors["rtn_error"] else "rtn"
    new = (q if kept == "gptq" else rtn).reshape(w.shape).to(w.dtype).to(w.device)
    layer.layer.weight.copy_(wq.fake_quant(new))  # exactly on the grid
    return {**errors, "kept": kept}


def _per_layer(config) -> None:
    if config.gptq.mode != "parallel":
        raise Sub8Error("GPTQ before bit allocation must be parallel (--gptq-mode parallel): sequential "
                        "inputs depend on the other layers' bits")


class _Counted(dict):
    """Per-layer records that move a progress bar as layers finish."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.bar.update(1)


class _SequentialGPTQ(fx.Interpreter):
    """Runs the graph once over all calibration samples, node by node: each quantized layer is
    GPTQ'd on the inputs the model quantized so far gives it, then run (in batches) with its
    new weights, so the layers after it see them."""

    def __init__(self, module, todo: dict, cfg: GPTQConfig, batch: int, records: dict):
        super().__init__(module)
        self.todo, self.cfg, self.batch, self.records = todo, cfg, batch, records

    def call_module(self, target, args, kwargs):
        layer = self.todo.get(target)
        x = args[0] if args else None
        if layer is None or not isinstance(x, torch.Tensor):
            return super().call_module(target, args, kwargs)
        acc = HessianAccumulator(layer)
        for i in range(0, len(x), self.batch):
            acc(layer, layer.smoothed(x[i:i + self.batch]))
        self.records[target] = {"name": target, **gptq_layer(layer, acc.hessian(), self.cfg)}
        return torch.cat([layer(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])


@register("gptq", settings=GPTQConfig, per_layer=_per_layer)
def gptq_step(ctx) -> dict:
    """GPTQ weight rounding, layer by layer, through the inverse Hessian of each layer's inputs."""
    cfg, c = ctx.config.gptq, ctx.config
    start = time.perf_counter()
    prepared = ctx.prepared
    layers = {n: m for n, m in prepared.quant_layers().items() if m.weight_quantizer.enabled}
    uncalibrated = [n for n, m in layers.items() if not m.weight_quantizer.initialized]
    if uncalibrated:
        raise Sub8Error("GPTQ needs calibrated grids: put 'ranges' before 'gptq'")
    calib = ctx.calib.to(c.device)
    shown = progress.bar(len(layers), "gptq", "layer")
    records: dict[str, dict] = _Counted(shown)
    with torch.no_grad():
        if cfg.mode == "parallel":  # every layer's H from the float model, in one pass
            accs = {n: HessianAccumulator(layers[n]) for n in layers}
            run_observed(prepared.reference, accs, calib, c.forward_batch)
            for n in layers:
                records[n] = {"name": n, **gptq_layer(layers[n], accs[n].hessian(), cfg)}
        elif isinstance(prepared.module, fx.GraphModule):
            _SequentialGPTQ(prepared.module, layers, cfg, c.forward_batch, records).run(calib)
        else:  # no graph: one pass over the whole set; each layer is GPTQ'd when the pass reaches it
            names = {id(m): n for n, m in layers.items()}

            def observe(site, x):
                name = names[id(site)]
                if name not in records:  # (a layer called twice in a forward is done once)
                    acc = HessianAccumulator(site)
                    acc(site, x)
                    records[name] = {"name": name, **gptq_layer(site, acc.hessian(), cfg)}

            run_observed(prepared.module, {n: observe for n in layers}, calib, len(calib), float_model=False)
    shown.close()
    order = [i.name for i in prepared.layers if i.name in records]
    return {"settings": asdict(cfg), "seconds": time.perf_counter() - start, "layers": [records[n] for n in order]}
