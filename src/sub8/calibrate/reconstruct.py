"""Block reconstruction (BRECQ, Li et al., 2021), learned rounding (AdaRound, Nagel et al., 2020)
and activation dropping (QDrop, Wei et al., 2022), on AdaQuant's machinery.

A unit (prepare/blocks.py: a block such as an inverted residual, else one layer with its
ReLU) is fitted whole: its layers' weights (free, as AdaQuant's, or each rounded up or down by
a learned choice), their biases and every quantizer step inside it, so that the unit's output
on the quantized model's inputs matches the float unit's output on the float inputs. The loss
is that output's squared error, each element weighted by the output loss's Fisher diagonal
there (fisher.py, BRECQ's choice), or plain. Units run in model order, each on the inputs that
the already-fitted units before it produce; in parallel mode (bit allocation's candidates,
where a layer must not depend on the others' bits) every unit is one layer on float inputs.
What is fitted: variables.py. Where a unit's inputs come from: a traced model's graph
(GraphUnits), or, in a model without one, the recorded arguments of the unit's module call
(CallUnits, calls.py: a transformer layer).

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
from ..quant.layers import float_mode, module_state
from ..quant.quantizer import Quantizer
from .adam import MultiTensorAdam
from ..heap import reuse_freed_memory
from .adaquant import LR_SCALE, BatchBuffers, plan_groups, reconstruction_grad
from .calls import CallRecord, CallUnit, padded, quantized_modules, record_call, token_weights
from .fisher import fisher_weights
from .split import holdout_split
from .variables import LearnedRounding, UnitVariables, beta_at, mix, random_mask

def mix_inputs(x_q: torch.Tensor, x_f: torch.Tensor, p: float, generator: torch.Generator):
    """QDrop's unit input: the float model's value where the mask (probability p) is 1, the
    quantized model's elsewhere. Returns (mixed, mask). An integer input (token ids, an
    attention mask) is the same in both models and stays as it is."""
    mask = random_mask(x_q, p, generator)
    if not x_q.is_floating_point():
        return x_q, mask
    return mix(x_f, x_q, mask), mask


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
    channels-last (mkldnn's convolutions run about twice as fast on it on CPU). Each output is
    written into its place in a tensor allocated at the first batch (gathering the batches and
    concatenating them held every output twice at the end: 3.3 GB for one ResNet-50 block input
    on 512 images)."""
    full = None
    n = len(inputs[0])
    device = next((p.device for p in module.parameters()), inputs[0].device)
    with torch.no_grad():
        for i in range(0, n, batch):
            outs = module(*[x[i:i + batch].to(device, torch.float32) for x in inputs])
            if any(not isinstance(t, torch.Tensor) or t.shape[:1] != (min(batch, n - i),) for t in outs):
                raise NotPerSample
            if full is None:
                full = [torch.empty((n, *t.shape[1:]), dtype=dtype, device=t.device,
                                    memory_format=torch.channels_last if t.dim() == 4 else torch.contiguous_format)
                        for t in outs]
            for acc, t in zip(full, outs):
                acc[i:i + len(t)] = t.detach()
    return full


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


# -- where units come from -------------------------------------------------------------------
def fitted_units(prepared: PreparedModel, block: bool) -> list[Unit]:
    """The units that hold a layer with quantized weights (nothing to fit in the others)."""
    layers = prepared.quant_layers()
    return [u for u in find_units(prepared.module, prepared.layers, block=block)
            if any(layers[k].weight_quantizer.enabled for k in u.layers)]


class GraphUnits:
    """The units of a traced model: each a subgraph, its inputs cached by advancing a frontier
    through the graph (or, past a value that is not per sample, from the model's input)."""

    def __init__(self, prepared: PreparedModel, calib: torch.Tensor, block: bool, forward_batch: int,
                 dtype: torch.dtype):
        self.prepared, self.calib, self.batch, self.dtype = prepared, calib, forward_batch, dtype
        self.gm = prepared.module
        self.view, self.ref_view = GraphView(self.gm), GraphView(prepared.reference)
        self.units = fitted_units(prepared, block)
        self.frontiers = {"q": Frontier(self.view, calib, forward_batch, dtype, float_model=False),
                          "f": Frontier(self.ref_view, calib, forward_batch, dtype, float_model=True)}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:  # (the cache's: chosen once the sizes are known)
        self._dtype = value
        for f in getattr(self, "frontiers", {}).values():
            f.dtype = value

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Per unit: the elements per sample of its inputs and of its output."""
        probe = sorted({n for u in self.units for n in (*u.inputs, u.output)},
                       key=lambda n: self.view.order[self.view.by_name[n]])
        with float_mode(self.prepared.reference):
            got = {n: t[0].numel() for n, t in zip(probe, run_all(self.ref_view.prefix(probe), [self.calib[:1]], 1,
                                                                     self.dtype))}
        return {u.name: (sum(got[n] for n in u.inputs), got[u.output]) for u in self.units}

    def values(self, kind: str, unit: Unit) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The unit's inputs (and, float model, its output) for every sample."""
        v = self.view if kind == "q" else self.ref_view
        frontier = self.frontiers.get(kind)
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
                self.frontiers.pop(kind)  # a shape crosses the boundary: from here on, from the model's input
        names = unit.inputs + ([unit.output] if kind == "f" else [])
        with float_mode(self.prepared.reference) if kind == "f" else contextlib.nullcontext():
            out = run_all(v.prefix(names), [self.calib], self.batch, self.dtype)
        return out[:len(unit.inputs)], (out[-1] if kind == "f" else None)

    def cached(self) -> list[torch.Tensor]:
        return [t for f in self.frontiers.values() for t in f.values.values()]

    def module(self, unit: Unit, variables: UnitVariables | None = None) -> nn.Module:
        return self.view.unit(unit, variables.stand_ins if variables else None)

    def variables(self, unit: Unit, cfg) -> UnitVariables:
        found = UnitVariables(cfg)
        for name in unit.nodes:
            node = self.view.by_name[name]
            if node.op == "call_module":
                found.add(node.target, self.gm.get_submodule(node.target))
        return found

    def owners(self, unit: Unit) -> list[str]:
        """The modules whose state a checkpoint of the unit keeps."""
        targets = {self.view.by_name[n].target for n in unit.nodes if self.view.by_name[n].op == "call_module"}
        return [t for t in targets if any(isinstance(m, Quantizer) for m in self.gm.get_submodule(t).modules())]

    def fisher(self, units: list[Unit], output_loss: str, cfg, seed: int) -> dict[str, torch.Tensor]:
        at = {u.name: u.output for u in units}
        return fisher_weights(self.prepared.reference, list(at), {}, self.calib, output_loss, cfg.fisher_draws,
                              self.batch, seed, self.dtype, at=at)

    def loss_weights(self, unit: Unit, fisher: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
        return fisher

    def valid(self, unit: Unit, y: torch.Tensor) -> None:
        return None


class CallUnits:
    """The units of a model without a graph (calls.py): each a module call, its arguments
    recorded for every sample by running the model up to it (text: padding counts nowhere)."""

    def __init__(self, prepared: PreparedModel, calib: torch.Tensor, block: bool, forward_batch: int,
                 dtype: torch.dtype):
        self.prepared, self.calib, self.batch, self.dtype = prepared, calib, forward_batch, dtype
        self.model = prepared.module
        self.units = fitted_units(prepared, block)
        self.templates: dict[str, CallRecord] = {}
        self.masks: dict[str, torch.Tensor | None] = {}

    def sizes(self) -> dict[str, tuple[int, int]]:
        got = {}
        with float_mode(self.prepared.reference):
            for u in self.units:
                r = record_call(self.prepared.reference, u.name, self.calib[:1], 1, self.dtype, True)
                got[u.name] = (sum(t[0].numel() for t in r.tensors), r.output[0].numel())
        return got

    def values(self, kind: str, unit: Unit) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        model = self.model if kind == "q" else self.prepared.reference
        with float_mode(model) if kind == "f" else contextlib.nullcontext():
            r = record_call(model, unit.name, self.calib, self.batch, self.dtype, want_output=kind == "f")
        self.templates[unit.name] = r.template()
        if kind == "f":
            self.masks[unit.name] = r.mask
        return r.tensors, r.output

    def cached(self) -> list[torch.Tensor]:
        return []

    def module(self, unit: Unit, variables: UnitVariables | None = None) -> nn.Module:
        return CallUnit(self.model.get_submodule(unit.name), self.templates[unit.name],
                        variables.stand_ins if variables else None)

    def variables(self, unit: Unit, cfg) -> UnitVariables:
        found = UnitVariables(cfg)
        for path, m in quantized_modules(self.model.get_submodule(unit.name)).items():
            found.add(path, m)
        return found

    def owners(self, unit: Unit) -> list[str]:
        return [".".join(p for p in (unit.name, path) if p)
                for path in quantized_modules(self.model.get_submodule(unit.name))]

    def fisher(self, units: list[Unit], output_loss: str, cfg, seed: int) -> dict[str, torch.Tensor]:
        return fisher_weights(self.prepared.reference, [u.name for u in units], {}, self.calib, output_loss,
                              cfg.fisher_draws, self.batch, seed, self.dtype)

    def loss_weights(self, unit: Unit, fisher: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
        """Fisher weights in the output's padded layout, else the real tokens' (None: all count)."""
        mask = self.masks.get(unit.name)
        return padded(fisher, mask, y) if fisher is not None else token_weights(mask, y)

    def valid(self, unit: Unit, y: torch.Tensor) -> torch.Tensor | None:
        return token_weights(self.masks.get(unit.name), y)


def unit_error(module: nn.Module, xs: list, y: torch.Tensor, w: torch.Tensor | None, rows: torch.Tensor,
               batch: int, valid: torch.Tensor | None = None) -> dict:
    """The unit's output error on the given rows: the plain MSE (over the `valid` elements: real
    tokens), and with weights the weighted one, a mean over the whole layout as the loss's (the
    weights are 0 at padding and mean 1)."""
    total, weighted, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            idx = rows[i:i + batch]
            out = module(*[as_input(x[idx]) for x in xs])[0]
            err = (out - y[idx].float()).square_()
            if valid is not None:
                keep = valid[idx] > 0
                err.mul_(keep)
                count += int(keep.sum())
            total += err.sum().item()
            if w is not None:
                weighted += err.mul_(w[idx].float()).sum().item()
    n = len(rows) * y[0].numel()
    return {"mse": total / max(count if valid is not None else n, 1), **({"fisher": weighted / n} if w is not None else {})}


def as_input(t: torch.Tensor) -> torch.Tensor:
    """A cached value as a unit's input: float32 if it is floating (the cache may be float16)."""
    return t.float() if t.is_floating_point() else t


def fit_unit(module: nn.Module, variables: UnitVariables, xs_q: list, xs_f: list | None, y: torch.Tensor,
             w: torch.Tensor | None, train: torch.Tensor, cfg, seed: int, on_batch=None) -> None:
    """Adam over the unit's variables on its output's (weighted) squared error. The mini-batches
    come from the generator seeded with `seed` (the unit's first layer's, as in AdaQuant), QDrop's
    masks from their own, so dropping does not change which samples are drawn."""
    steps, weights = variables.steps, variables.weights
    params, lrs = [], []
    for weight, bias, lr_bias in variables.biases:  # per layer: weights, bias, then the steps (AdaQuant's order)
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
    features = y.shape[1] if y.dim() == 4 else y.shape[-1]  # (images: channels; tokens, rows: the last)
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
        with reuse_freed_memory():  # (see adaquant.optimize)
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
                    # BRECQ's and QDrop's balance: the regularizer against the squared error
                    # summed over the features at one position (their loss sums over dim 1 and
                    # averages over the rest); this loss is the mean over all of them.
                    (sum(v.regularizer(beta) for v in rounding) * (cfg.rounding_reg / features)).backward()
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
    """Fit every unit that holds a layer with quantized weights, in model order. Returns the
    record for report.json: the settings, the units and each unit's held-out error before and
    after. With `checkpoints`, each finished unit is saved and one saved by an interrupted run
    of the same command is loaded instead of fitted again."""
    sequential = cfg.mode == "sequential"
    kind = GraphUnits if isinstance(prepared.module, fx.GraphModule) else CallUnits
    source = kind(prepared, calib, sequential and cfg.reconstruct == "block", forward_batch, torch.float32)
    units = source.units
    position = {i.name: k for k, i in enumerate(prepared.layers)}
    train, held = holdout_split(len(calib), cfg.holdout, seed, "AdaQuant")
    train, held = train.to(calib.device), held.to(calib.device)
    float_inputs = cfg.qdrop > 0 or not sequential

    # Cache elements per unit: its inputs (quantized, and float for QDrop), its target and weights.
    sizes = source.sizes()
    elements = {name: len(calib) * (inputs * (2 if float_inputs else 1) + output * (2 if cfg.weighted else 1))
                for name, (inputs, output) in sizes.items()}
    budget = int(cfg.max_memory_gb * 2 ** 30)
    # A unit too large for the budget in float32 that fits in float16 (a ResNet-50 block's four
    # 56x56x256 tensors on 512 images: 6.1 GB) is cached in float16 rather than refused.
    half = cfg.cache_fp16 or max(elements.values(), default=0) * 4 > budget >= max(elements.values(), default=0) * 2
    dtype = torch.float16 if half else torch.float32
    source.dtype = dtype
    cost = {name: n * (2 if half else 4) for name, n in elements.items()}
    groups = plan_groups([u.name for u in units], cost, budget)
    by_name = {u.name: u for u in units}

    bar = progress.bar(len(units) * cfg.iters, f"reconstruct ({cfg.reconstruct}, {cfg.rounding} rounding"
                       f"{f', qdrop {cfg.qdrop:g}' if cfg.qdrop else ''})" if show_progress else None, "it")
    records, resumed, peak, optimize_seconds, index = [], 0, 0, 0.0, 0
    for group in groups:
        fisher = None  # the group's Fisher weights, from one float pass when a unit needs them
        for unit in (by_name[n] for n in group):
            saved = None if checkpoints is None else checkpoints.load("unit", index, unit.name, unit.layers)
            index += 1
            if saved is not None:  # fitted by an interrupted run of the same command
                for target, state in saved["states"].items():
                    prepared.module.get_submodule(target).load_state_dict(state)
                records.append(saved["record"])
                resumed += 1
                bar.update(cfg.iters)
                continue
            start = time.perf_counter()
            xs_f, y = source.values("f", unit)
            xs_q = source.values("q", unit)[0] if sequential else xs_f
            xs_f = xs_f if float_inputs else None
            if cfg.weighted and fisher is None:
                fisher = source.fisher([by_name[n] for n in group], output_loss, cfg, seed)
            w = source.loss_weights(unit, fisher.pop(unit.name) if cfg.weighted else None, y)
            valid = source.valid(unit, y)
            peak = max(peak, _nbytes(xs_q, [y], [w] if w is not None else [], xs_f or [],
                                     (fisher or {}).values(), source.cached()))
            real = source.module(unit)
            before = unit_error(real, xs_q, y, w, held, forward_batch, valid)
            variables = source.variables(unit, cfg)
            started = time.perf_counter()
            fit_unit(source.module(unit, variables), variables, xs_q, xs_f, y, w, train, cfg,
                     seed * 100_003 + position[unit.layers[0]])
            optimize_seconds += time.perf_counter() - started
            after = unit_error(real, xs_q, y, w, held, forward_batch, valid)
            record = {"name": unit.name, "kind": unit.kind, "layers": unit.layers,
                      **{f"heldout_{e}_before": v for e, v in before.items()},
                      **{f"heldout_{e}_after": v for e, v in after.items()},
                      "seconds": time.perf_counter() - start}
            if variables.weights and cfg.rounding == "learned":
                weights = variables.weights
                record["rounded_up"] = sum(int((v.codes(hard=True) - v.base - v.zero).clamp(0, 1).sum())
                                           for v in weights) / sum(v.base.numel() for v in weights)
            records.append(record)
            if checkpoints is not None:
                states = {t: module_state(prepared.module.get_submodule(t)) for t in source.owners(unit)}
                checkpoints.save({"states": states, "record": record}, "unit", index - 1, unit.name, unit.layers)
            del xs_q, xs_f, y, w, valid
            bar.update(cfg.iters)
    bar.close()
    return {"settings": asdict(cfg), "cache_dtype": str(dtype).removeprefix("torch."),
            "units": [u.to_dict() for u in units], "n_train": len(train),
            "n_heldout": len(held), "groups": len(groups), "resumed_units": resumed,
            "peak_cache_mb": peak / 2 ** 20, "optimize_seconds": optimize_seconds,
            "seconds_per_iter": optimize_seconds / cfg.iters if cfg.iters else 0.0, "layers": records}


def _nbytes(*collections) -> int:
    return sum(t.numel() * t.element_size() for c in collections for t in c)
