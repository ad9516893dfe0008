"""Block reconstruction (BRECQ, Li et al., 2021), learned rounding (AdaRound, Nagel et al., 2020)
and activation dropping (QDrop, Wei et al., 2022), on AdaQuant's machinery.

A unit (prepare/blocks.py: a block such as an inverted residual, else one layer with its
ReLU) is fitted whole: its layers' weights (free, as AdaQuant's, or each rounded up or down by
a learned choice), their biases and every quantizer step inside it, so that the unit's output
on the quantized model's inputs matches the float unit's output on the float inputs. The loss
is that output's squared error, each element weighted by the output loss's Fisher diagonal
there (fisher.py, BRECQ's choice), or plain. Units run in graph order, each on the inputs that
the already-fitted units before it produce; in parallel mode (bit allocation's candidates,
where a layer must not depend on the others' bits) every unit is one layer on float inputs.

Learned rounding: a weight ends on one of its two neighbouring grid points, floor(W/s) + h(V)
with h a stretched sigmoid clipped to [0, 1]; after a warm-up a regularizer whose exponent
anneals from 20 to 2 pushes every h to 0 or 1, and the end rounds h at 1/2.

QDrop: while a unit is fitted, each of its activation quantizers passes its float input instead,
element by element, with probability p; and the unit's input comes from the float model's cache
where a mask drawn with the same p says, from the quantized model's elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict

import torch
from torch import fx, nn

from .. import progress
from ..errors import Sub8Error
from ..prepare import PreparedModel
from ..prepare.blocks import Unit, find_units
from ..quant.layers import QuantInput, QuantLayer, float_mode, module_state
from ..quant.quantizer import Quantizer
from .adam import MultiTensorAdam
from .adaquant import LR_SCALE, BatchBuffers, plan_groups, reconstruction_grad
from .fisher import fisher_weights
from .split import holdout_split

ZETA, GAMMA = 1.1, -0.1     # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1
WARMUP = 0.2                # share of the iterations before the rounding regularizer starts
BETA = (20.0, 2.0)          # the regularizer's exponent, annealed from the first to the second


def mix_inputs(x_q: torch.Tensor, x_f: torch.Tensor, p: float, generator: torch.Generator):
    """QDrop's unit input: the float model's value where the mask (probability p) is set, the
    quantized model's elsewhere. Returns (mixed, mask)."""
    mask = random_mask(x_q, p, generator)
    return torch.where(mask, x_f, x_q), mask


def random_mask(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """True with probability p per element, in x's memory layout (a channels-last mask keeps the
    mixed tensor channels-last, and the convolutions after it on their fast path)."""
    return torch.empty_like(x, dtype=torch.float32).uniform_(generator=generator) < p


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def beta_at(it: int, iters: int) -> float | None:
    """The regularizer's exponent at iteration `it`, None during the warm-up."""
    t = it / max(iters, 1)
    if t < WARMUP:
        return None
    rel = (t - WARMUP) / (1 - WARMUP)
    return BETA[1] + (BETA[0] - BETA[1]) * max(0.0, 1.0 - rel)


# -- the free variables ---------------------------------------------------------------------
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
        # (with dropping, the quantized value feeds torch.where, not only the layer)
        out = self.q.fake_quant(x, self.step(), overwrite_grad=overwrite_grad and not self.drop)
        if self.drop:
            out = torch.where(random_mask(x, self.drop, self.generator), x, out)
        return out

    @torch.no_grad()
    def finish(self) -> None:
        self.q.step.copy_(self.step())


class FreeWeights:
    """AdaQuant's weights: free, in units of their channel's initial grid step."""

    def __init__(self, layer: QuantLayer, lr: float, steps: StepVariable):
        w = layer.layer.weight
        self.layer, self.steps = layer, steps
        self.grid = steps.step0.view(-1, *[1] * (w.dim() - 1))
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


# -- graph pieces ------------------------------------------------------------------------------
def _attr(gm: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def subgraph(gm: fx.GraphModule, keep: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
             modules: dict | None = None) -> fx.GraphModule:
    """A module computing `outputs` from `inputs` with the nodes `keep` of `gm` (in graph order),
    sharing gm's submodules; `modules` replaces some of them (by target)."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    root = {}
    for n in keep:
        if n in env:
            continue
        new = graph.node_copy(n, lambda a: env[a])
        if n.op in ("call_module", "get_attr"):
            new.target = f"m{len(root)}"  # flat names: a layer and its own quantizer can both be targets
            root[new.target] = modules[n.target] if modules and n.target in modules else _attr(gm, n.target)
        env[n] = new
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, graph)


def ancestors(outputs: list[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(outputs)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


class GraphView:
    """Node lookups by name in a traced model, and modules computing chosen nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise Sub8Error("block reconstruction needs a model with one input tensor")

    def prefix(self, names: list[str]) -> fx.GraphModule:
        """The model input -> the named nodes' values."""
        outs = [self.by_name[n] for n in names]
        keep = sorted(ancestors(outs), key=self.order.get)
        return subgraph(self.gm, keep, self.placeholders, outs)

    def unit(self, unit: Unit, modules: dict | None = None) -> fx.GraphModule:
        keep = [self.by_name[n] for n in unit.nodes]
        keep += [a for n in keep for a in n.all_input_nodes if a.op == "get_attr"]
        keep = sorted(set(keep), key=self.order.get)
        return subgraph(self.gm, keep, [self.by_name[n] for n in unit.inputs], [self.by_name[unit.output]], modules)


def run_all(module: nn.Module, inputs: list[torch.Tensor], batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """`module` over all samples in batches; its outputs (a tuple) cached in `dtype`, images
    channels-last (mkldnn's convolutions run about twice as fast on it on CPU)."""
    parts = None
    device = next((p.device for p in module.parameters()), inputs[0].device)
    with torch.no_grad():
        for i in range(0, len(inputs[0]), batch):
            outs = module(*[x[i:i + batch].to(device, torch.float32) for x in inputs])
            parts = parts or [[] for _ in outs]
            for acc, t in zip(parts, outs):
                if not isinstance(t, torch.Tensor) or t.shape[:1] != (min(batch, len(inputs[0]) - i),):
                    raise NotPerSample
                fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
                acc.append(t.detach().to(dtype, memory_format=fmt))
    return [torch.cat(p) for p in parts]


class NotPerSample(Exception):
    """A value between two parts of the graph is not a tensor with one row per sample (a shape)."""


class Frontier:
    """Every sample's values of the graph's live tensors at one position of the graph order.
    Advancing runs only the nodes between that position and the next, so that caching every
    unit's inputs costs one pass over the model in all, where capturing them from the model's
    input reran the model's prefix for each unit."""

    def __init__(self, view: GraphView, calib: torch.Tensor, batch: int, dtype: torch.dtype, float_model: bool):
        self.view, self.batch, self.dtype, self.float_model = view, batch, dtype, float_model
        self.values = {view.placeholders[0]: calib}
        self.pos = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self.view.by_name[name]]

    def advance(self, upto: int) -> None:
        """Compute, from the values held, every node before position `upto` that a node at or
        after it reads."""
        view = self.view
        if upto <= self.pos:
            return
        nodes = [n for n in view.nodes[self.pos:upto] if n.op not in ("placeholder", "output", "get_attr")]

        def live(n):
            return any(view.order[u] >= upto for u in n.users)

        new = {}
        if nodes:
            inside = set(nodes)
            reads = sorted({a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"},
                           key=view.order.get)
            keep = sorted(inside | {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"},
                          key=view.order.get)
            outs = [n for n in nodes if live(n)]
            if outs:
                module = subgraph(view.gm, keep, reads, outs)
                with float_mode(view.gm) if self.float_model else contextlib.nullcontext():
                    new = dict(zip(outs, run_all(module, [self.values[r] for r in reads], self.batch, self.dtype)))
        self.values = {**{n: v for n, v in self.values.items() if live(n)}, **new}
        self.pos = upto


# -- fitting one unit ------------------------------------------------------------------------
def unit_variables(gm: fx.GraphModule, unit: Unit, view: GraphView, cfg):
    """Stand-ins for the unit's layers and quantizer sites ({target: module}); per layer with
    quantized weights (its weights, its bias, the bias's rate); the steps; the weights."""
    steps: dict[int, StepVariable] = {}

    def step_of(q: Quantizer, lr: float) -> StepVariable | None:
        if not q.enabled:
            return None
        if id(q) not in steps:
            steps[id(q)] = StepVariable(q, lr)
        return steps[id(q)]

    stand_ins, weights = {}, []
    for name in unit.nodes:
        node = view.by_name[name]
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, QuantLayer):
            ws = step_of(m.weight_quantizer, cfg.lr_weight_quant)
            kind = LearnedRounding if cfg.rounding == "learned" else FreeWeights
            w = kind(m, cfg.lr_rounding if cfg.rounding == "learned" else cfg.lr_weight, ws) if ws else None
            stand_ins[node.target] = VariableLayer(m, w, step_of(m.input_quantizer, cfg.lr_input_quant))
            weights += [w] if w else []
        elif isinstance(m, (QuantInput, Quantizer)):
            q = m.input_quantizer if isinstance(m, QuantInput) else m
            s = step_of(q, cfg.lr_input_quant)
            if s is not None:
                stand_ins[node.target] = VariableSite(s)
    biases = [(s.weights, s.wrapped.layer.bias, cfg.lr_bias) for s in stand_ins.values()
              if isinstance(s, VariableLayer) and s.weights is not None]
    return stand_ins, biases, list(steps.values()), weights


def unit_error(module: nn.Module, xs: list, y: torch.Tensor, w: torch.Tensor | None, rows: torch.Tensor,
               batch: int) -> dict:
    """The unit's output error on the given rows: plain MSE, and Fisher-weighted with weights."""
    total, weighted = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            idx = rows[i:i + batch]
            out = module(*[x[idx].float() for x in xs])[0]
            err = (out - y[idx].float()).square_()
            total += err.sum().item()
            if w is not None:
                weighted += err.mul_(w[idx].float()).sum().item()
    n = len(rows) * y[0].numel()
    return {"mse": total / n, **({"fisher": weighted / n} if w is not None else {})}


def fit_unit(module: nn.Module, steps: list[StepVariable], weights: list, biases: list, xs_q: list, xs_f: list | None,
             y: torch.Tensor, w: torch.Tensor | None, train: torch.Tensor, cfg, seed: int, on_batch=None) -> None:
    """Adam over the unit's variables on its output's (weighted) squared error. The mini-batches
    come from the generator seeded with `seed` (the unit's first layer's, as in AdaQuant), QDrop's
    masks from their own, so dropping does not change which samples are drawn."""
    params, lrs = [], []
    for weight, bias, lr_bias in biases:  # per layer: weights, bias, then the steps (AdaQuant's order)
        params += weight.params
        lrs += weight.lrs
        params.append(bias)
        lrs.append(lr_bias)
    for s in steps:
        params += s.params
        lrs += s.lrs
    for p in params:
        p.requires_grad_(True)
    opt = MultiTensorAdam(params, lrs)
    batch = min(cfg.batch_size, len(train))
    numel = y[0].numel()
    grad_scale = 2.0 / (batch * numel)  # the mean's 2/N, on the parameters' gradients
    zero_points = [z for s in steps for z in s.zero_points]
    zp = ([z for z, _, _ in zero_points], [float(lo) for _, lo, _ in zero_points], [float(hi) for *_, hi in zero_points])
    batches = train[torch.randint(len(train), (cfg.iters, batch),
                                  generator=torch.Generator().manual_seed(seed))].to(y.device)
    dropping = torch.Generator(device=y.device).manual_seed(seed + 1_000_003)
    for s in steps:
        s.drop, s.generator = cfg.qdrop, dropping
    rounding = [v for v in weights if isinstance(v, LearnedRounding)]
    buffers = BatchBuffers()
    lr_scale = LR_SCALE[cfg.lr_schedule]
    try:
        for it in range(cfg.iters):
            opt.zero_grad()
            idx = batches[it]
            args = [buffers.gather(f"x{i}", x, idx) for i, x in enumerate(xs_q)]
            if cfg.qdrop and xs_f is not None:
                mixed = [mix_inputs(a, buffers.gather(f"f{i}", f, idx), cfg.qdrop, dropping) for i, (a, f)
                         in enumerate(zip(args, xs_f))]
                if on_batch is not None:
                    on_batch(it, idx, mixed)
                args = [m for m, _ in mixed]
            out = module(*args)[0]
            weight = buffers.gather("w", w, idx) if w is not None else None
            out.backward(reconstruction_grad(out.detach(), buffers.gather("y", y, idx), (None, None), weight))
            with torch.no_grad():
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], grad_scale)
            beta = beta_at(it, cfg.iters)
            if rounding and beta is not None:
                # BRECQ's balance: the regularizer against the per-sample sum of squared errors.
                (sum(v.regularizer(beta) for v in rounding) * (cfg.rounding_reg / numel)).backward()
            opt.step(lr_scale(it, cfg.iters))
            if zp[0]:
                with torch.no_grad():
                    torch._foreach_clamp_min_(zp[0], zp[1])
                    torch._foreach_clamp_max_(zp[0], zp[2])
    finally:
        for s in steps:
            s.drop, s.generator = 0.0, None
    for v in [*weights, *steps]:
        v.finish()
    for p in params:
        p.requires_grad_(False)
        p.grad = None


# -- the step --------------------------------------------------------------------------------
def reconstruct(prepared: PreparedModel, calib: torch.Tensor, cfg, forward_batch: int = 32, seed: int = 0,
                show_progress: bool = True, checkpoints=None, output_loss: str = "kl") -> dict:
    """Fit every unit that holds a layer with quantized weights, in graph order. Returns the
    record for report.json: the settings, the units and each unit's held-out error before and
    after. With `checkpoints`, each finished unit is saved and one saved by an interrupted run
    of the same command is loaded instead of fitted again."""
    gm = prepared.module
    if not isinstance(gm, fx.GraphModule):
        raise Sub8Error("--reconstruct block, --rounding learned and --qdrop need a model that torch.fx "
                        "traces; this one runs without a graph: use layer-wise AdaQuant (the defaults)")
    sequential = cfg.mode == "sequential"
    layers = prepared.quant_layers()
    units = [u for u in find_units(gm, prepared.layers, block=sequential and cfg.reconstruct == "block")
             if any(layers[k].weight_quantizer.enabled for k in u.layers)]
    position = {i.name: k for k, i in enumerate(prepared.layers)}
    view, ref_view = GraphView(gm), GraphView(prepared.reference)
    train, held = holdout_split(len(calib), cfg.holdout, seed, "AdaQuant")
    train, held = train.to(calib.device), held.to(calib.device)
    dtype = torch.float16 if cfg.cache_fp16 else torch.float32
    float_inputs = cfg.qdrop > 0 or not sequential

    # Cache bytes per unit: its inputs (quantized, and float for QDrop), its target and weights.
    probe = sorted({n for u in units for n in (*u.inputs, u.output)}, key=lambda n: view.order[view.by_name[n]])
    with float_mode(prepared.reference):
        sizes = {n: t[0].numel() for n, t in zip(probe, run_all(ref_view.prefix(probe), [calib[:1]], 1, dtype))}
    elem = 2 if cfg.cache_fp16 else 4
    cost = {u.name: len(calib) * elem * (sum(sizes[n] for n in u.inputs) * (2 if float_inputs else 1)
                                         + sizes[u.output] * (2 if cfg.weighted else 1)) for u in units}
    groups = plan_groups([u.name for u in units], cost, int(cfg.max_memory_gb * 2 ** 30))
    by_name = {u.name: u for u in units}

    frontiers = {"q": Frontier(view, calib, forward_batch, dtype, float_model=False),
                 "f": Frontier(ref_view, calib, forward_batch, dtype, float_model=True)}

    def values(kind: str, unit: Unit) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The unit's inputs (and, float model, its output) for every sample."""
        v = view if kind == "q" else ref_view
        frontier = frontiers.get(kind)
        nodes = [v.by_name[n] for n in unit.nodes]
        first, last = min(map(v.order.get, nodes)), max(map(v.order.get, nodes))
        if frontier is not None and all(v.order[v.by_name[n]] < first for n in unit.inputs):
            try:
                frontier.advance(first)
                xs = [frontier[n] for n in unit.inputs]
                if kind == "q":
                    return xs, None
                frontier.advance(last + 1)
                return xs, frontier[unit.output]
            except NotPerSample:
                frontiers.pop(kind)  # a shape crosses the boundary: from here on, from the model's input
        names = unit.inputs + ([unit.output] if kind == "f" else [])
        with float_mode(prepared.reference) if kind == "f" else contextlib.nullcontext():
            out = run_all(v.prefix(names), [calib], forward_batch, dtype)
        return out[:len(unit.inputs)], (out[-1] if kind == "f" else None)

    bar = progress.bar(len(units) * cfg.iters, f"reconstruct ({cfg.reconstruct}, {cfg.rounding} rounding"
                       f"{f', qdrop {cfg.qdrop:g}' if cfg.qdrop else ''})" if show_progress else None, "it")
    records, resumed, peak, optimize_seconds, index = [], 0, 0, 0.0, 0
    for group in groups:
        loss_weights = None  # the group's Fisher weights, from one float pass when a unit needs them
        for unit in (by_name[n] for n in group):
            saved = None if checkpoints is None else checkpoints.load("unit", index, unit.name, unit.layers)
            index += 1
            if saved is not None:  # fitted by an interrupted run of the same command
                for target, state in saved["states"].items():
                    gm.get_submodule(target).load_state_dict(state)
                records.append(saved["record"])
                resumed += 1
                bar.update(cfg.iters)
                continue
            start = time.perf_counter()
            xs_f, y = values("f", unit)
            xs_q = values("q", unit)[0] if sequential else xs_f
            xs_f = xs_f if float_inputs else None
            if cfg.weighted and loss_weights is None:
                at = {by_name[n].name: by_name[n].output for n in group}
                loss_weights = fisher_weights(prepared.reference, list(at), {}, calib, output_loss, cfg.fisher_draws,
                                              forward_batch, seed, dtype, at=at)
            w = loss_weights.pop(unit.name) if cfg.weighted else None
            peak = max(peak, _nbytes(xs_q, [y], [w] if w is not None else [], xs_f or [],
                                     (loss_weights or {}).values(), *(f.values.values() for f in frontiers.values())))
            real = view.unit(unit)
            before = unit_error(real, xs_q, y, w, held, forward_batch)
            stand_ins, biases, steps, weights = unit_variables(gm, unit, view, cfg)
            started = time.perf_counter()
            fit_unit(view.unit(unit, stand_ins), steps, weights, biases, xs_q, xs_f, y, w, train, cfg,
                     seed * 100_003 + position[unit.layers[0]])
            optimize_seconds += time.perf_counter() - started
            after = unit_error(real, xs_q, y, w, held, forward_batch)
            record = {"name": unit.name, "kind": unit.kind, "layers": unit.layers,
                      **{f"heldout_{e}_before": v for e, v in before.items()},
                      **{f"heldout_{e}_after": v for e, v in after.items()},
                      "seconds": time.perf_counter() - start}
            if weights and cfg.rounding == "learned":
                record["rounded_up"] = sum(int((v.codes(hard=True) - v.base - v.zero).clamp(0, 1).sum())
                                           for v in weights) / sum(v.base.numel() for v in weights)
            records.append(record)
            if checkpoints is not None:
                owners = {view.by_name[n].target for n in unit.nodes if view.by_name[n].op == "call_module"}
                states = {t: module_state(gm.get_submodule(t)) for t in owners
                          if any(isinstance(m, Quantizer) for m in gm.get_submodule(t).modules())}
                checkpoints.save({"states": states, "record": record}, "unit", index - 1, unit.name, unit.layers)
            del xs_q, xs_f, y, w
            bar.update(cfg.iters)
    bar.close()
    return {"settings": asdict(cfg), "units": [u.to_dict() for u in units], "n_train": len(train),
            "n_heldout": len(held), "groups": len(groups), "resumed_units": resumed,
            "peak_cache_mb": peak / 2 ** 20, "optimize_seconds": optimize_seconds,
            "seconds_per_iter": optimize_seconds / cfg.iters if cfg.iters else 0.0, "layers": records}


def _nbytes(*collections) -> int:
    return sum(t.numel() * t.element_size() for c in collections for t in c)
