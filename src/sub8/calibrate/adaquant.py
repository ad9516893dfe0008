"""AdaQuant: layer-wise calibration (Hubara et al., 2021), parallel and sequential.

For each quantized layer, minimize over the calibration set
    || act(f(X; W, b)) - act(f(Q_a(X'); Q_w(W + dW), b + db)) ||^2
over the weights, the bias and both quantizers' steps and zero points (Adam, one learning rate
per group). `act` is the ReLU/ReLU6 that the graph says follows the layer, else the identity.
With `loss="fisher"`, each element's squared error is weighted by how much it moves the model's
output loss (see fisher.py): a layer's plain MSE can prefer what the output cannot afford.
Parallel: X' = X, the float input, so layers are independent and a group of them is optimized
in one loop (the summed loss gives each layer exactly its own gradients, and Adam is
per-parameter). Sequential: X' is the input that the already-quantized model before the layer
produces, for every calibration sample.

Inputs and targets are cached for a group of layers at a time, within `max_memory_gb`; the
float model is re-run for each group (and in sequential mode the quantized model for each
layer). A held-out share of the calibration samples never enters the optimization and measures
each layer's reconstruction error before and after.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from .. import progress
from ..errors import Sub8Error
from ..executor import InProcessExecutor
from ..prepare import PreparedModel
from ..heap import cat_freeing, reuse_freed_memory
from ..quant.layers import QuantLayer, StopForward, module_state, quant_inputs, quant_layers, run_observed
from ..registry import setting
from .adam import MultiTensorAdam
from .fisher import fisher_weights
from .split import holdout_split
from .variables import weight_unit

# auto: sequential for a run at the chosen bits; parallel where bit allocation replays the step
# per candidate precision (there each layer must not depend on the others' bits).
ADAQUANT_MODES = ("auto", "parallel", "sequential")
ADAQUANT_LOSSES = ("mse", "fisher")
LR_SCHEDULES = ("cosine", "constant")
RECONSTRUCT_UNITS = ("auto", "layer", "block")
ROUNDINGS = ("free", "learned")
# What a run can afford: iterations per layer or block, mini-batch and the two rates that a
# shorter run needs higher. full: the paper's (a GPU's); cpu: 20 minutes or less for MobileNetV2
# W4A4 on 256 photos on 2 cores (README, benchmarks/results/reconstruct*.json).
BUDGETS = {"cpu": {"iters": 100, "batch_size": 16, "lr_weight": 1e-2, "lr_input_quant": 1e-1},
           "full": {"iters": 1000, "batch_size": 50, "lr_weight": 1e-3, "lr_input_quant": 1e-2}}
# Iterations per block where a sequential run fits blocks and --iters is not given. On CPU
# more than per layer: MobileNetV2 W4A4 (256 photos, seed 0) kept 0.772 of its confident top-1s
# at 400 (KL 0.739, 7.1 minutes) against 0.712 at 100 (KL 0.815, 2.1 minutes); W4A8 0.929 at
# both, KL 0.232 against 0.253 (benchmarks/results/reconstruct_iters.json). Layer-wise runs, bit
# allocation's candidates among them, keep the budget's per-layer count.
BLOCK_ITERS = {"cpu": 400, "full": 1000}
# QDrop's probability where blocks are fitted, some activation has fewer than 8 bits and --qdrop
# is not given (the paper's). With every activation at 8 bits there is little rounding for the
# dropping to make the weights robust to, and mixing in float inputs costs a second cache: on
# MobileNetV2 W4A8 (100 iterations per block, seeds 0-2) blocks kept 0.961 of the confident
# top-1s on every seed without it, 0.943-0.950 with it, in half to two thirds of the time
# (benchmarks/results/reconstruct_w4a8_qdrop*.json).
BLOCK_QDROP = 0.5


@dataclass
class AdaQuantConfig:
    # Sequential corrects what the layers before it got wrong: on MobileNetV2 (faster setting,
    # the demo crops) it kept 0.77 of the confident top-1s at W4A8 and 0.71 at W4A4, parallel
    # 0.26 and 0.23 (benchmarks/results/adaquant_quality.json).
    mode: str = setting("auto", flag="--adaquant", choices=ADAQUANT_MODES,
                        help="AdaQuant inputs: the quantized model's (sequential) or the float model's "
                             "(parallel); auto: sequential, but parallel for bit allocation's candidates")
    budget: str = setting("auto", flag="--budget", choices=("auto", *BUDGETS),
                          help="iterations, mini-batch and rates where not given: cpu (100 per layer, 400 per block, "
                               "batch 16, --lr-weight 1e-2, --lr-input-quant 1e-1), full (the paper's 1000, "
                               "batch 50, 1e-3, 1e-2); auto: full on CUDA, cpu otherwise")
    iters: int | None = setting(None, flag="--iters", type=int,
                                help="AdaQuant iterations per layer or block (default: from --budget)")
    batch_size: int | None = setting(None, flag="--batch-size", type=int,
                                     help="AdaQuant mini-batch (default: from --budget)")
    # Weights move in units of their channel's grid step (a 4-bit one where the input is
    # coarser; see LayerVariables): the paper's absolute 1e-5 is about 1e-3 of a step for
    # MobileNetV2's 1x1 convs at 4 bits, but under 1e-4 for its depthwise convs, which then
    # barely move.
    lr_weight: float | None = setting(None, flag="--lr-weight", type=float,
                                      help="relative rate of the weights (in units of their channel's grid "
                                           "step, a 4-bit one where the input has fewer bits; default: "
                                           "from --budget)")
    lr_bias: float = setting(1e-3, flag="--lr-bias", help="AdaQuant's rate of the biases")
    # Quantizer steps are optimized in log space, so these two are relative rates; the paper's
    # absolute 1e-1 for the input step becomes 1e-2 here.
    lr_weight_quant: float = setting(1e-3, flag="--lr-weight-quant",
                                     help="relative rate of the weight steps (log space)")
    lr_input_quant: float | None = setting(None, flag="--lr-input-quant", type=float,
                                           help="relative rate of the input steps (log space; default: from --budget)")
    # Every rate decays to 0 along a half cosine over the iterations (the reference code keeps
    # them constant: Adam then hovers around the optimum instead of settling in it).
    lr_schedule: str = setting("cosine", flag="--lr-schedule", choices=LR_SCHEDULES,
                               help="AdaQuant learning rates: cosine decay to 0, or constant")
    holdout: float = setting(0.1, flag="--holdout", help="share of calibration samples kept out of "
                             "AdaQuant and bias tuning to measure them")
    # The reconstruction loss: each element's squared error weighted by the output loss's Fisher
    # diagonal there (see fisher.py), estimated from `fisher_draws` backward passes of the float
    # model per calibration sample; or the paper's plain MSE of the layer's activated output.
    loss: str = setting("fisher", flag="--adaquant-loss", choices=ADAQUANT_LOSSES,
                        help="AdaQuant's reconstruction loss: plain MSE, or each element weighted by the "
                             "output loss's Fisher diagonal (see README)")
    fisher_draws: int = setting(1, flag="--fisher-draws",
                                help="backward passes per calibration sample that estimate the Fisher weights")
    # Past the paper (calibrate/reconstruct.py): BRECQ's blocks, AdaRound's learned rounding and
    # QDrop's activation dropping; sequential runs only (parallel runs stay per layer). Blocks
    # with QDrop beat layer-wise AdaQuant at W4A4 on every seed measured, in less time
    # (benchmarks/results/reconstruct_seeds.json; MiniLM: reconstruct_text.json), hence auto.
    reconstruct: str = setting("auto", flag="--reconstruct", choices=RECONSTRUCT_UNITS,
                               help="fit each layer alone, or each block (an inverted residual, a residual "
                                    "block, a transformer layer) as a whole on its output; auto: blocks in a "
                                    "sequential run, layers in a parallel one")
    rounding: str = setting("free", flag="--rounding", choices=ROUNDINGS,
                            help="weights free to move (AdaQuant), or each rounded up or down by a learned "
                                 "choice (AdaRound)")
    qdrop: float | None = setting(None, flag="--qdrop", type=float,
                                  help="probability that an activation quantizer passes its float input, per "
                                       f"element, while a unit is fitted (QDrop; default: {BLOCK_QDROP} when "
                                       "blocks are fitted and some activation has fewer than 8 bits, else 0)")
    lr_rounding: float = setting(1e-2, flag="--lr-rounding", help="rate of the learned-rounding variables")
    rounding_reg: float = setting(0.01, flag="--rounding-reg",
                                  help="weight of the regularizer that drives learned rounding to 0 or 1")
    max_memory_gb: float = setting(4.0, flag="--max-memory", help="GB bound on AdaQuant's cached activations")
    cache_fp16: bool = setting(False, flag="--cache-fp16", is_flag=True,
                               help="cache AdaQuant activations in float16")

    def __post_init__(self):
        if self.mode not in ADAQUANT_MODES:
            raise Sub8Error(f"adaquant.mode must be one of {', '.join(ADAQUANT_MODES)}, got {self.mode!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise Sub8Error(f"adaquant.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                            f"got {self.lr_schedule!r}")
        if self.budget not in ("auto", *BUDGETS):
            raise Sub8Error(f"adaquant.budget must be one of auto, {', '.join(BUDGETS)}, got {self.budget!r}")
        if (self.iters is not None and self.iters < 0) or (self.batch_size is not None and self.batch_size < 1):
            raise Sub8Error("AdaQuant needs adaquant.iters >= 0 and adaquant.batch_size >= 1")
        if self.loss not in ADAQUANT_LOSSES:
            raise Sub8Error(f"adaquant.loss must be one of {', '.join(ADAQUANT_LOSSES)}, got {self.loss!r}")
        if self.fisher_draws < 1:
            raise Sub8Error(f"adaquant.fisher_draws must be at least 1, got {self.fisher_draws}")
        if not 0.0 < self.holdout < 1.0:
            raise Sub8Error(f"adaquant.holdout must be in (0, 1), got {self.holdout}")
        if self.reconstruct not in RECONSTRUCT_UNITS:
            raise Sub8Error(f"adaquant.reconstruct must be one of {', '.join(RECONSTRUCT_UNITS)}, got {self.reconstruct!r}")
        if self.rounding not in ROUNDINGS:
            raise Sub8Error(f"adaquant.rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.qdrop is not None and not 0.0 <= self.qdrop < 1.0:
            raise Sub8Error(f"adaquant.qdrop (--qdrop) must be in [0, 1), got {self.qdrop}")
        if self.max_memory_gb <= 0:
            raise Sub8Error(f"adaquant.max_memory_gb (--max-memory) must be positive, got {self.max_memory_gb}")

    def resolve(self, device, coarsest_input_bits: int | None = None) -> "AdaQuantConfig":
        """The settings a run on `device` uses: the budget's numbers where none were given, the
        mode (auto: sequential), the units (auto: blocks where sequential) and QDrop's
        probability (BLOCK_QDROP where blocks are fitted and `coarsest_input_bits`, the fewest
        bits of any quantized activation, is under 8). What report.json records."""
        budget = self.budget if self.budget != "auto" else ("full" if torch.device(device).type == "cuda" else "cpu")
        given = {k: v for k, v in BUDGETS[budget].items() if getattr(self, k) is None}
        mode = "sequential" if self.mode == "auto" else self.mode
        units = self.reconstruct
        if units == "auto":
            units = "block" if mode == "sequential" else "layer"
        blocks = units == "block" and mode == "sequential"
        if blocks and self.iters is None:
            given["iters"] = BLOCK_ITERS[budget]
        qdrop = self.qdrop
        if qdrop is None or mode == "parallel":  # (parallel inputs are float already: nothing to mix)
            coarse = coarsest_input_bits is not None and coarsest_input_bits < 8
            qdrop = BLOCK_QDROP if blocks and coarse else 0.0
        return replace(self, budget=budget, mode=mode, reconstruct=units, qdrop=qdrop, **given)

    @property
    def beyond_layers(self) -> bool:
        """Whether calibrate/reconstruct.py fits this run rather than layer-wise AdaQuant (a
        parallel run's units are single layers: blocks alone change nothing there)."""
        blocks = self.reconstruct == "block" and self.mode != "parallel"
        return blocks or self.rounding != "free" or self.qdrop > 0

    @property
    def weighted(self) -> bool:
        """Whether the loss weights its elements (then the cache holds the weights too)."""
        return self.loss == "fisher"


ACTIVATIONS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}
LR_SCALE = {"constant": lambda it, iters: 1.0,
            "cosine": lambda it, iters: 0.5 * (1 + math.cos(math.pi * it / iters))}
ACTIVATION_BOUNDS = {None: (None, None), "relu": (0.0, None), "relu6": (0.0, 6.0)}


@torch.no_grad()
def reconstruction_grad(out: torch.Tensor, target: torch.Tensor, bounds,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of sum(weight * (act(out) - target) ** 2) / 2 with respect to `out`, where
    `act` is the ReLU/ReLU6 that follows the layer (bounds (lo, hi); none: the identity), written
    over `target`: weight * (out - target) where act passes `out` through, 0 where it clamps
    (inside the range act(out) = out, so no clamp is needed). Two memory passes (three with a
    weight), against five for autograd's relu + mse_loss; the mean's 2/N is applied to the
    parameters' gradients instead (see optimize), which are small."""
    grad = torch.sub(out, target, out=target)
    if weight is not None:
        grad.mul_(weight)
    lo, hi = bounds
    if hi is not None:
        torch.ops.aten.hardtanh_backward.grad_input(grad, out, lo, hi, grad_input=grad)
    elif lo is not None:
        torch.ops.aten.threshold_backward.grad_input(grad, out, lo, grad_input=grad)
    return grad


class InputCache:
    """Stores a layer's inputs, batch after batch; stops the forward after `stop` is seen."""

    def __init__(self, dtype: torch.dtype, stop: bool):
        self.parts: list[torch.Tensor] = []
        self.dtype = dtype
        self.stop = stop

    def __call__(self, layer, x):
        # Channels-last: mkldnn's convolutions run about twice as fast on it on CPU.
        fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        self.parts.append(x.detach().to(self.dtype, memory_format=fmt))
        if self.stop:
            raise StopForward

    def tensor(self) -> torch.Tensor:
        return cat_freeing(self.parts)


def capture_inputs(module: torch.nn.Module, names: list[str], calib: torch.Tensor, batch: int,
                   dtype: torch.dtype, float_model: bool) -> dict[str, torch.Tensor]:
    """Inputs of the named layers (in graph order) for every calibration sample."""
    caches = {n: InputCache(dtype, stop=(n == names[-1])) for n in names}
    run_observed(module, caches, calib, batch, float_model=float_model)
    return {n: c.tensor() for n, c in caches.items()}


@torch.no_grad()
def float_target(layer: QuantLayer, x: torch.Tensor, act, batch: int) -> torch.Tensor:
    """The layer's activated float output for every row of x (joined by cat_freeing: held once)."""
    w, b = layer.layer.weight, layer.layer.bias
    return cat_freeing([act(layer.apply(x[i:i + batch].float(), w, b)).to(x.dtype) for i in range(0, len(x), batch)])


def per_sample_bytes(prepared: PreparedModel, example: torch.Tensor, elem: int,
                     weighted: bool = False) -> dict[str, int]:
    """Bytes that one calibration sample's input and target (and loss weights) take in the
    cache, per layer."""
    sizes = {}
    layers = prepared.quant_layers()
    name_of = {id(m): n for n, m in layers.items()}

    def probe(layer, x):
        out = layer.apply(x, layer.layer.weight, layer.layer.bias)
        # (all of x: one sample's rows, which a text model hands over as tokens x features)
        sizes[name_of[id(layer)]] = (x.numel() + out.numel() * (2 if weighted else 1)) * elem

    run_observed(prepared.module, {n: probe for n in layers}, example[:1], 1)
    return sizes


def plan_groups(names: list[str], cost: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive layers whose caches fit the budget together."""
    groups, current, used = [], [], 0
    for n in names:
        if cost[n] > budget:
            raise Sub8Error(f"layer {n!r} alone needs {cost[n] / 2 ** 30:.2f} GB of cached activations, "
                            f"over --max-memory {budget / 2 ** 30:.2f} GB; raise it, use --cache-fp16 "
                            f"or fewer --samples")
        if current and used + cost[n] > budget:
            groups.append(current)
            current, used = [], 0
        current.append(n)
        used += cost[n]
    if current:
        groups.append(current)
    return groups


class LayerVariables:
    """One layer's free variables and their learning rates.

    Adam's update has a fixed size in parameter units, and weights and steps differ by orders of
    magnitude across layers and channels (on MobileNetV2 the 4-bit weight step is ~0.2 in a
    depthwise conv and ~0.008 in a 1x1 expansion), so one absolute learning rate is far too
    small for some and too big for others. Weights are therefore optimized in units of their
    channel's initial step, a 4-bit one where the input is coarser (W = unit * V,
    variables.weight_unit: a rate of 1e-3 moves a 4-bit weight by at most 0.1% of a grid step
    per iteration) and steps in log space (step = step0 * exp(u), a relative rate).
    Zero points live on the integer grid and use absolute learning rates (integer units).
    """

    def __init__(self, layer: QuantLayer, cfg: AdaQuantConfig):
        self.layer = layer
        w = layer.layer.weight
        self.grid = weight_unit(layer)
        self.weight = (w.detach() / self.grid).clone()
        self.params = [self.weight, layer.layer.bias]
        self.lrs = [cfg.lr_weight, cfg.lr_bias]
        self.log_steps = {}
        self.zero_points = []  # (tensor, qmin, qmax)
        for key, lr in (("weight_quantizer", cfg.lr_weight_quant), ("input_quantizer", cfg.lr_input_quant)):
            q = getattr(layer, key)
            if not q.enabled:
                continue
            u = torch.zeros_like(q.step)
            self.log_steps[key] = (q, q.step.detach().clone(), u)
            self.params.append(u)
            self.lrs.append(lr)
            if not q.symmetric:
                self.params.append(q.zero_point)
                self.lrs.append(lr)
                self.zero_points.append((q.zero_point, q.qmin, q.qmax))
        for p in self.params:
            p.requires_grad_(True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized layer's output with the steps being optimized."""
        layer, steps = self.layer, self.log_steps
        if "input_quantizer" in steps:
            q, step0, u = steps["input_quantizer"]
            x = q.fake_quant(x, step0 * torch.exp(u), overwrite_grad=True)  # feeds the layer only
        q, step0, u = steps["weight_quantizer"]
        return layer.apply(x, q.fake_quant(self.weight * self.grid, step0 * torch.exp(u)), layer.layer.bias)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the optimized steps back and stop tracking gradients."""
        for q, step0, u in self.log_steps.values():
            q.step.copy_(step0 * torch.exp(u))
        self.layer.layer.weight.copy_(self.weight * self.grid)
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


def reconstruction_mse(layer: QuantLayer, x: torch.Tensor, y: torch.Tensor, act, batch: int,
                       weight: torch.Tensor | None = None) -> float:
    """The mean squared error of the layer's activated output (weighted by `weight` if given)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            err = (act(layer.compute(x[i:i + batch].float())) - y[i:i + batch].float()).square_()
            total += (err if weight is None else err.mul_(weight[i:i + batch].float())).sum()
    return (total / y.numel()).item()


def heldout_errors(layer: QuantLayer, x, y, weight, held: torch.Tensor, act, batch: int) -> dict:
    """On the held-out rows: the plain MSE, and the Fisher-weighted error when there are weights."""
    x, y = x[held], y[held]
    errors = {"mse": reconstruction_mse(layer, x, y, act, batch)}
    if weight is not None:
        errors["fisher"] = reconstruction_mse(layer, x, y, act, batch, weight[held])
    return errors


class BatchBuffers:
    """Preallocated mini-batch buffers, one per (role, shape, dtype, layout), shared by the
    layers of a group: one layer's batch is alive at a time. Gathering into them runs at copy
    speed; `cache[idx]` allocates a fresh tensor per layer and iteration (2.3x slower on CPU)."""

    def __init__(self):
        self.pool: dict = {}

    def gather(self, role: str, cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        key = (role, cache.shape[1:], cache.dtype, cache.stride()[1:])
        buf = self.pool.get(key)
        if buf is None:
            buf = self.pool[key] = torch.empty_like(cache[:len(idx)])  # keeps channels-last
        torch.index_select(cache, 0, idx, out=buf)
        return buf.float() if buf.is_floating_point() and buf.dtype != torch.float32 else buf  # (masks stay)


def optimize(layers: dict[str, QuantLayer], xs: dict, ys: dict, followed: dict, train: torch.Tensor,
             cfg: AdaQuantConfig, seeds: dict[str, int], progress=None, ws: dict | None = None) -> None:
    """Adam over the layers' variables on their reconstruction losses, one step for all
    (`ws`: per-element loss weights, by layer; none: the plain MSE).

    Each layer draws its mini-batches from its own generator (seeded by its position in the
    model), so a layer sees the same batches whether it is optimized alone or in a group."""
    variables = {n: LayerVariables(layer, cfg) for n, layer in layers.items()}
    params = [p for v in variables.values() for p in v.params]
    opt = MultiTensorAdam(params, [lr for v in variables.values() for lr in v.lrs])
    batch = min(cfg.batch_size, len(train))
    # The loss is a mean over the layer's batch output: its 2/N, applied to the gradients.
    grad_scales = [2.0 / (batch * ys[n][0].numel()) for n, v in variables.items() for _ in v.params]
    # Zero points stay on their grid: one multi-tensor clamp per iteration for all layers.
    zero_points = [z for v in variables.values() for z in v.zero_points]
    zp_tensors = [z for z, _, _ in zero_points]
    zp_min, zp_max = [float(lo) for _, lo, _ in zero_points], [float(hi) for _, _, hi in zero_points]
    # Every iteration's mini-batch indices up front, on the cache's device: a host-to-device
    # copy inside the loop would make the CPU wait for the GPU at every layer.
    batches = {n: train[torch.randint(len(train), (cfg.iters, batch),
                                      generator=torch.Generator().manual_seed(seeds[n]))].to(xs[n].device)
               for n in layers}
    bounds = {n: ACTIVATION_BOUNDS[followed[n]] for n in layers}
    buffers = BatchBuffers()
    lr_scale = LR_SCALE[cfg.lr_schedule]
    # Freed mini-batch blocks stay in the heap while the loop runs (heap.py); only while it
    # runs: over a whole run, cache-sized tensors in the heap fragmented it, 9.3 GB peak RSS for
    # a 4 GB cache budget on ResNet-50.
    with reuse_freed_memory():
        for it in range(cfg.iters):
            opt.zero_grad()
            # Each layer's backward right after its forward: the layers are independent, so the
            # gradients are those of the summed loss, and only one layer's activations are alive
            # at a time (a whole group's at once ran 1.4x slower on CPU, out of cache).
            for n, v in variables.items():
                idx = batches[n][it]
                out = v(buffers.gather("x", xs[n], idx))
                weight = buffers.gather("w", ws[n], idx) if ws else None
                out.backward(reconstruction_grad(out.detach(), buffers.gather("y", ys[n], idx), bounds[n], weight))
            with torch.no_grad():
                torch._foreach_mul_([p.grad for p in params], grad_scales)
            opt.step(lr_scale(it, cfg.iters))
            if zp_tensors:
                with torch.no_grad():
                    torch._foreach_clamp_min_(zp_tensors, zp_min)
                    torch._foreach_clamp_max_(zp_tensors, zp_max)
            if progress is not None:
                progress.update(len(layers))
    for v in variables.values():
        v.finish()


def adaquant(prepared: PreparedModel, calib: torch.Tensor, cfg: AdaQuantConfig | None = None,
             forward_batch: int = 32, seed: int = 0, show_progress: bool = True, checkpoints=None,
             output_loss: str = "kl", executor=None) -> dict:
    """Run AdaQuant on every quantized layer with quantized weights. Returns the record for
    report.json: the settings, the cache groups and each layer's held-out MSE (and Fisher-weighted
    error) before/after and input step before/after.
    With `checkpoints` (resume.ScopedCheckpoints), each finished group is saved, and a group
    saved by an interrupted run is loaded instead of optimized again. `output_loss` (kl or mse)
    is the model output's loss that Fisher weights (`cfg.loss == "fisher"`) stand for. In
    parallel mode the groups are independent work items for `executor` (default: in-process)."""
    bits = [s.input_quantizer.bits for s in quant_inputs(prepared.module).values() if s.input_quantizer.enabled]
    cfg = (cfg or AdaQuantConfig()).resolve(calib.device, min(bits, default=None))
    torch.set_flush_denormal(True)  # Adam's second moments decay into denormals: 20x slower on CPU
    try:
        if cfg.beyond_layers:
            from .reconstruct import reconstruct
            return reconstruct(prepared, calib, cfg, forward_batch, seed, show_progress, checkpoints, output_loss)
        return _adaquant(prepared, calib, cfg, forward_batch, seed, show_progress, checkpoints, output_loss,
                         executor or InProcessExecutor())
    finally:
        torch.set_flush_denormal(False)


@dataclass
class GroupWork:
    """One memory group of layers to optimize. Parallel mode: the item computes the float inputs
    and targets itself. Sequential mode: the caller hands over the quantized model's inputs
    (`xs`) and the float targets (`ys`, `ws`)."""
    layers: dict                      # name -> QuantLayer, optimized in place; states come back
    float_module: torch.nn.Module     # the untouched float (reference) model
    calib: torch.Tensor
    cfg: AdaQuantConfig
    followed: dict                    # name -> the activation after the layer
    seeds: dict                       # name -> mini-batch generator seed
    train: torch.Tensor
    held: torch.Tensor
    forward_batch: int
    seed: int
    dtype: torch.dtype
    output_loss: str
    xs: dict | None = None
    ys: dict | None = None
    ws: dict | None = None
    setup_seconds: float = 0.0


def float_inputs_and_targets(float_module, group: list[str], calib, cfg, followed, forward_batch, seed, dtype,
                             output_loss):
    """The float model's inputs of the group's layers, their activated float outputs, and (with
    the Fisher loss) the loss weights."""
    float_layers = quant_layers(float_module)
    xs_float = capture_inputs(float_module, group, calib, forward_batch, dtype, float_model=True)
    ys = {k: float_target(float_layers[k], xs_float[k], ACTIVATIONS[followed[k]], forward_batch) for k in group}
    ws = {} if not cfg.weighted else fisher_weights(float_module, group, followed, calib, output_loss,
                                                    cfg.fisher_draws, forward_batch, seed, dtype)
    return xs_float, ys, ws


def _nbytes(*caches: dict) -> int:
    return sum(t.numel() * t.element_size() for d in caches for t in d.values())


def fit_group(work: GroupWork) -> dict:
    """Optimize one group; {"states", "records", "peak_cache", "optimize_seconds"}."""
    start = time.perf_counter()
    group = list(work.layers)
    if work.xs is None:
        xs, ys, ws = float_inputs_and_targets(work.float_module, group, work.calib, work.cfg, work.followed,
                                              work.forward_batch, work.seed, work.dtype, work.output_loss)
    else:
        xs, ys, ws = work.xs, work.ys, work.ws or {}
    peak = _nbytes(xs, ys, ws)
    layers, acts = work.layers, {k: ACTIVATIONS[work.followed[k]] for k in group}
    h = work.held.to(work.calib.device)
    before = {k: heldout_errors(layers[k], xs[k], ys[k], ws.get(k), h, acts[k], work.forward_batch) for k in group}
    steps_before = {k: layers[k].input_quantizer.step.item() for k in group if layers[k].input_quantizer.enabled}
    started = time.perf_counter()
    optimize(layers, xs, ys, work.followed, work.train, work.cfg, work.seeds, None, ws)
    if work.calib.is_cuda:
        torch.cuda.synchronize()
    optimize_seconds = time.perf_counter() - started
    seconds = (time.perf_counter() - start + work.setup_seconds) / len(group)
    records = {}
    for k in group:
        after = heldout_errors(layers[k], xs[k], ys[k], ws.get(k), h, acts[k], work.forward_batch)
        records[k] = {"name": k, **{f"heldout_{e}_before": v for e, v in before[k].items()},
                      **{f"heldout_{e}_after": v for e, v in after.items()}, "seconds": seconds}
        if k in steps_before:
            records[k]["input_step"] = {"before": steps_before[k], "after": layers[k].input_quantizer.step.item()}
    return {"states": {k: module_state(layers[k]) for k in group}, "records": records, "peak_cache": peak,
            "optimize_seconds": optimize_seconds}


def _adaquant(prepared, calib, cfg, forward_batch, seed, show_progress, checkpoints, output_loss, executor) -> dict:
    layers = prepared.quant_layers()
    # Optimized layers change their float weights: inputs and targets come from the reference.
    float_module = prepared.reference
    info = {i.name: i for i in prepared.layers}
    names = [i.name for i in prepared.layers if layers[i.name].weight_quantizer.enabled]
    followed = {n: info[n].followed_by for n in names}
    seeds = {n: seed * 100_003 + k for k, n in enumerate(i.name for i in prepared.layers)}

    train, held = holdout_split(len(calib), cfg.holdout, seed, "AdaQuant")

    dtype = torch.float16 if cfg.cache_fp16 else torch.float32
    elem = 2 if cfg.cache_fp16 else 4
    budget = int(cfg.max_memory_gb * 2 ** 30)
    weighted = cfg.weighted
    cost = {k: v * len(calib) for k, v in per_sample_bytes(prepared, calib, elem, weighted).items()}
    groups = plan_groups(names, cost, budget)  # also refuses a layer that alone exceeds the budget
    sequential = cfg.mode == "sequential"
    if sequential:
        # Each layer waits for the ones before it, but its float target does not: the targets
        # of a whole memory group come from one float pass (one per layer made the float
        # model's passes quadratic in depth), then each layer's quantized inputs from its own.
        target_group = {k: i for i, g in enumerate(groups) for k in g}
        target_groups, groups = groups, [[k] for k in names]

    def work(group, **caches) -> GroupWork:
        return GroupWork({k: layers[k] for k in group}, float_module, calib, cfg, followed, seeds, train, held,
                         forward_batch, seed, dtype, output_loss, **caches)

    records, peak_cache, optimize_seconds = {}, 0, 0.0
    bar = progress.bar(len(names) * cfg.iters, f"adaquant ({cfg.mode})" if show_progress else None, "it")
    resumed, todo = 0, []
    for index, group in enumerate(groups):
        saved = None if checkpoints is None else checkpoints.load("group", index, group)
        if saved is not None:  # optimized by an interrupted run of the same command
            for k in group:
                layers[k].load_state_dict(saved["states"][k])
                records[k] = saved["records"][k]
            resumed += 1
            bar.update(len(group) * cfg.iters)
        else:
            todo.append((index, group))

    def finished(index, group, result) -> None:
        nonlocal peak_cache, optimize_seconds
        for k in group:
            layers[k].load_state_dict(result["states"][k])
            records[k] = result["records"][k]
        peak_cache = max(peak_cache, result["peak_cache"])
        optimize_seconds += result["optimize_seconds"]
        bar.update(len(group) * cfg.iters)
        if checkpoints is not None:
            checkpoints.save({"states": result["states"], "records": result["records"]}, "group", index, group)

    if not sequential:  # independent groups: work items for the executor
        items = [work(group) for _, group in todo]
        for (index, group), result in zip(todo, executor.map(fit_group, items)):
            finished(index, group, result)
    else:
        targets: dict[str, torch.Tensor] = {}  # the current memory group's targets (and loss weights)
        weights: dict[str, torch.Tensor] = {}
        for index, group in todo:
            start = time.perf_counter()
            k = group[0]
            if k not in targets:  # this layer's and the rest of its memory group's
                rest = target_groups[target_group[k]]
                xs_float, targets, weights = float_inputs_and_targets(float_module, rest[rest.index(k):], calib, cfg,
                                                                      followed, forward_batch, seed, dtype, output_loss)
                peak_cache = max(peak_cache, _nbytes(xs_float, targets, weights))
                del xs_float
            ys = {k: targets.pop(k)}
            ws = {k: weights.pop(k)} if weighted else {}
            # the quantized model's own inputs, for every sample
            xs = capture_inputs(prepared.module, group, calib, forward_batch, dtype, float_model=False)
            peak_cache = max(peak_cache, _nbytes(xs, ys, ws, targets, weights))
            result = fit_group(work(group, xs=xs, ys=ys, ws=ws, setup_seconds=time.perf_counter() - start))
            del xs, ys, ws
            finished(index, group, result)
    bar.close()
    return {"settings": asdict(cfg), "n_train": len(train), "n_heldout": len(held),
            "groups": len(groups), "resumed_groups": resumed, "peak_cache_mb": peak_cache / 2 ** 20,
            # The optimization loops alone (the rest is caching and measuring); per iteration,
            # summed over all layers: the cost that grouping and the fused kernels cut.
            "optimize_seconds": optimize_seconds,
            "seconds_per_iter": optimize_seconds / cfg.iters if cfg.iters else 0.0,
            "layers": [records[k] for k in names]}
