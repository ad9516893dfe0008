"""Bit allocation end to end: candidates, sensitivities, the integer program, the mixed model.

1. Candidates: for each candidate precision, the per-layer steps that come before allocation in
   the pipeline (range calibration, parallel AdaQuant) run on a copy of the model at that uniform
   precision; each layer's resulting state is kept. These steps treat layers independently, so
   any mix of per-layer states is a valid model.
2. Sensitivities: the loss increase of each (layer, precision) over the base-precision model.
3. The integer program picks one precision per layer; the run's model takes the chosen states.
Candidates and sensitivities are cached on disk, keyed by the model, the calibration data and
every setting they depend on: a second solve with another budget only re-solves.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import progress
from ..cache import DiskCache, fingerprint, tensor_digest
from ..calibrate.ranges import calibrate_ranges
from ..errors import Sub8Error
from ..executor import InProcessExecutor
from ..evaluate import predict
from ..prepare import PreparedModel
from ..quant.layers import float_mode, module_state
from ..quant.quantizer import parse_bits
from ..registry import setting
from .costs import cost_tables, load_latency_table, parse_precision, precision_label
from .sensitivity import SensitivityWork, measure_precision, model_loss
from .solve import Problem, greedy, minimize_cost, minimize_degradation


SOLVERS = ("milp", "greedy")


def _precisions(text) -> tuple:
    return tuple(parse_precision(p) for p in text.split(",") if p.strip())


@dataclass
class AllocationConfig:
    """Bit allocation by integer programming."""
    # Candidate (weight bits, activation bits) per layer; `base` is added if missing.
    precisions: tuple = setting(((8, 8), (4, 8), (4, 4), (2, 4)), flag="--precisions", parse=_precisions,
                                show=lambda v: ",".join(precision_label(p) for p in v),
                                help="candidate precisions for bit allocation")
    # the precision every other layer holds while one is measured
    base: tuple = setting((8, 8), flag="--base-bits", parse=parse_precision, show=precision_label,
                          help="precision of the other layers while one layer's sensitivity is measured")
    size_ratio: float | None = setting(None, flag="--size-ratio", type=float,
                                       help="bit allocation budget: weight memory / the float32 model's")
    bops_ratio: float | None = setting(None, flag="--bops-ratio", type=float,
                                       help="bit allocation budget: BOPs / the float model's at 32x32 bits "
                                            "(W8A8 = 0.0625)")
    latency_ms: float | None = setting(None, flag="--latency-ms", type=float,
                                       help="bit allocation budget: summed layer latency")
    latency_table: str | None = setting(None, flag="--latency-table", type=str,
                                        help="JSON: layer -> precision (W4A8, float) -> ms")
    max_degradation: float | None = setting(None, flag="--max-degradation", type=float,
                                            help="least weight memory whose predicted loss increase is at most this")
    ties: tuple[str, ...] = setting((), flag="--tie", multiple=True,
                                    help="PAT1,PAT2,...: matching layers get one precision (repeatable)")
    sensitivity_samples: int | None = setting(None, flag="--sensitivity-samples", type=int,
                                              help="measure sensitivities on the first N calibration samples "
                                                   "[default: all]")
    solver: str = setting("milp", flag="--solver", choices=SOLVERS, help="milp (exact) or greedy (baseline)")
    # The first and last layers join the allocation instead of holding first_last_bits.
    first_last: bool = setting(False, flag="--allocate-first-last", is_flag=True,
                               help="bit allocation also chooses the first and last layers' precision "
                                    "(else they hold --first-last-bits)")

    def __post_init__(self):
        self.precisions = tuple(tuple(parse_bits(b) for b in p) for p in self.precisions)
        self.base = tuple(parse_bits(b) for b in self.base)
        if not self.precisions:
            raise Sub8Error("bit allocation needs at least one candidate precision (allocation.precisions)")
        if self.solver not in SOLVERS:
            raise Sub8Error(f"allocation.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        for name in ("size_ratio", "bops_ratio", "latency_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise Sub8Error(f"allocation.{name} must be positive, got {value}")
        self.ties = tuple(self.ties)
        if self.sensitivity_samples is not None and self.sensitivity_samples < 1:
            raise Sub8Error(f"allocation.sensitivity_samples must be at least 1, got {self.sensitivity_samples}")

    def has_budget(self) -> bool:
        return any(v is not None for v in (self.size_ratio, self.bops_ratio, self.latency_ms,
                                           self.max_degradation))


def layer_states(prepared: PreparedModel) -> dict[str, dict]:
    return {n: module_state(layer) for n, layer in prepared.quant_layers().items()}


def state_bits(state: dict) -> tuple:
    """(weight bits, input bits) recorded in a QuantLayer's state."""
    def bits(key):
        b = state[f"{key}._extra_state"]["bits"]
        return None if b == -1 else b
    return bits("weight_quantizer"), bits("input_quantizer")


def tie_groups(patterns: tuple[str, ...], layers: list[str]) -> list[list[int]]:
    """Each item ('pat1,pat2,...') ties every allocated layer it matches to one precision."""
    groups = []
    for item in patterns:
        pats = [p.strip() for p in item.split(",") if p.strip()]
        members = [i for i, n in enumerate(layers) if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not members:
            raise Sub8Error(f"--tie {item!r} matches no layer whose bits are allocated")
        if len(members) > 1:
            groups.append(members)
    # Overlapping items tie everything they share: merge them.
    merged: list[set] = []
    for g in map(set, groups):
        for m in [m for m in merged if m & g]:
            merged.remove(m)
            g |= m
        merged.append(g)
    return [sorted(g) for g in merged]


# Budget name -> (absolute cost it bounds, whether the budget is a ratio of the float model's).
BUDGETS = {"size_ratio": ("size", True), "bops_ratio": ("bops", True), "latency_ms": ("latency", False)}


def problem_costs(costs: dict, const: dict, reference: dict) -> tuple[dict, dict]:
    """Costs in the budgets' own units (ratios of the float model's, or ms), so that budgets,
    solver tolerances and error messages all speak the user's numbers."""
    out, fixed = {}, {}
    for name, (cost, ratio) in BUDGETS.items():
        if cost in costs and (not ratio or reference.get(cost)):
            scale = reference[cost] if ratio else 1.0
            out[name], fixed[name] = costs[cost] / scale, const[cost] / scale
    return out, fixed


def candidate_states(precisions: list[tuple], common: str, run_candidates, cache: DiskCache) -> tuple[dict, dict]:
    """({precision: {layer: state}}, {precision: {step: record}}) after the recipe at each
    uniform precision (cached with the records its steps wrote). `run_candidates(precisions)`
    yields each missing precision's {"states", "records"}, in order."""
    states, records, todo = {}, {}, []
    for p in precisions:
        run = cache.get("candidate_run", fingerprint(common, p))
        if run is None:
            todo.append(p)
        else:
            states[p], records[p] = run["states"], run["records"]
    for p, run in zip(todo, run_candidates(todo)):
        cache.put("candidate_run", fingerprint(common, p), run)
        states[p], records[p] = run["states"], run["records"]
    return states, records


def sensitivities(prepared: PreparedModel, layers: list[str], states: dict, base: tuple, sample: torch.Tensor,
                  reference: torch.Tensor, config, common: str, cache: DiskCache,
                  show_progress: bool, executor) -> tuple[float, dict]:
    """(the base model's loss, {precision: {layer: loss}}), from the cache where it has them."""
    kind, batch = config.output_loss, config.forward_batch
    cached = cache.get("sensitivity", fingerprint(common, base, kind))
    if cached is None:
        base_loss = model_loss(prepared.module, sample, reference, kind, batch)
        cache.put("sensitivity", fingerprint(common, base, kind), {"base": base_loss})
    else:
        base_loss = cached["base"]
    losses, todo = {base: dict.fromkeys(layers, base_loss)}, {}
    for p in states:
        if p != base:
            got = cache.get("sensitivity", fingerprint(common, base, p, kind))
            if got is not None and all(n in got for n in layers):
                losses[p] = got
            else:
                todo[p] = states[p]
    # One work item per precision and group of layers: the model holds the base states, each
    # item swaps one layer at a time in and back (an executor elsewhere gets its own copy of the
    # model). Each cell is measured alone, so how the layers are grouped changes no number; an
    # executor with more slots than precisions gets the table cut finer.
    n_groups = max(1, min(len(layers), -(-2 * executor.slots // max(1, len(todo))))) if executor.slots > 1 else 1
    groups = [layers[g::n_groups] for g in range(n_groups)]
    cells = [(p, g) for p in todo for g in groups]
    items = [SensitivityWork(prepared.module, g, states[base], {n: todo[p][n] for n in g}, sample, reference, kind,
                             batch) for p, g in cells]
    results = executor.map(measure_precision, items)
    got = {p: {} for p in todo}
    with progress.bar(len(items), "sensitivity" if show_progress else None, "cell group") as shown:
        for (p, g), values in zip(cells, results):
            got[p].update(values)
            if len(got[p]) == len(layers):
                ordered = {n: got[p][n] for n in layers}
                cache.put("sensitivity", fingerprint(common, base, p, kind), ordered)
                losses[p] = ordered
            shown.update(1)
    return base_loss, losses


def allocate(model: torch.nn.Module, prepared: PreparedModel, calib: torch.Tensor, config,
             recipe: tuple[str, ...], run_candidates, cache: DiskCache, recipe_key: dict,
             show_progress: bool = True, executor=None) -> dict:
    """Allocate bits to `prepared`'s layers (in place) and return the record for report.json.
    `run_candidates(precisions)` yields, for each precision, {"states": {layer: state},
    "records": {step: record}} of a fresh model at that uniform precision after the recipe's
    per-layer steps. `recipe_key` (the recipe's settings) joins every cache key."""
    executor = executor or InProcessExecutor()
    cfg = config.allocation
    timings = {}
    base = tuple(cfg.base)
    precisions = list(dict.fromkeys([base, *map(tuple, cfg.precisions)]))
    common = fingerprint(tensor_digest(model.state_dict().values()), type(model).__qualname__,
                         tensor_digest([calib]), recipe, recipe_key, config.ranges, config.percentile,
                         config.w_symmetric, config.a_symmetric, config.first_last_bits,
                         config.embedding_bits, config.quantize_attention and config.a_bits, cfg.first_last,
                         sorted(config.layer_bits.items()), config.seed, config.forward_batch,
                         str(config.device))

    start = time.perf_counter()
    states, candidate_records = candidate_states(precisions, common, run_candidates, cache)
    timings["candidates"] = time.perf_counter() - start

    order = [i.name for i in prepared.layers]
    layers = [n for n in order if all(state_bits(states[p][n]) == p for p in precisions)]
    if not layers:
        raise Sub8Error("no layer's bits can be allocated: every layer is fixed by --first-last-bits "
                        "or --layer-bits")
    qlayers = prepared.quant_layers()
    for n in order:  # the base model: every layer at its base-precision state
        qlayers[n].load_state_dict(states[base][n])
    # What is not allocated (embedding tables, attention operands) keeps the run's own bits.
    calibrate_ranges(prepared, calib, config.ranges, config.percentile, config.forward_batch, config.seed,
                     layers=False)

    start = time.perf_counter()
    # The sensitivities' samples: the calibration set, or its first `sensitivity_samples`.
    sample = calib[:cfg.sensitivity_samples] if cfg.sensitivity_samples else calib
    with float_mode(prepared.reference) as float_module:
        reference = predict(float_module, sample, config.forward_batch, config.device)
    base_loss, losses = sensitivities(prepared, layers, states, base, sample, reference, config,
                                      fingerprint(common, len(sample)), cache, show_progress, executor)
    timings["sensitivity"] = time.perf_counter() - start

    start = time.perf_counter()
    table = np.array([[losses[p][n] - base_loss for p in precisions] for n in layers])
    latency = load_latency_table(cfg.latency_table) if cfg.latency_table else None
    if cfg.latency_ms is not None and latency is None:
        raise Sub8Error("--latency-ms needs --latency-table FILE.json (layer -> precision -> ms)")
    costs, const, ref = cost_tables(prepared, layers, states, precisions, latency)
    problem = Problem(layers, precisions, table, *problem_costs(costs, const, ref), tie_groups(cfg.ties, layers))
    budgets = {name: getattr(cfg, name) for name in BUDGETS if getattr(cfg, name) is not None}
    try:
        if cfg.max_degradation is not None:
            choice = minimize_cost(problem, "size_ratio", cfg.max_degradation, budgets)
        elif cfg.solver == "greedy":
            choice = greedy(problem, budgets)
        else:
            choice = minimize_degradation(problem, budgets)
    except Sub8Error as exc:
        if cfg.first_last or not {order[0], order[-1]} - set(layers):
            raise
        raise Sub8Error(f"{exc}; the first and last layers hold --first-last-bits "
                        f"(--allocate-first-last lets the program choose theirs too)") from None
    timings["solve"] = time.perf_counter() - start

    for i, n in enumerate(layers):
        qlayers[n].load_state_dict(states[precisions[choice[i]]][n])
    prepared.sync_bits()
    measured = model_loss(prepared.module, sample, reference, config.output_loss, config.forward_batch) - base_loss

    totals = {}
    for name, (cost, _) in BUDGETS.items():
        if cost in costs:
            result = float(const[cost] + costs[cost][np.arange(len(layers)), choice].sum())
            totals[cost] = {"float": ref.get(cost), "result": result,
                            "ratio": result / ref[cost] if ref.get(cost) else None, "budget": budgets.get(name),
                            "budget_unit": name}
    return {"solver": "greedy" if cfg.solver == "greedy" and cfg.max_degradation is None else "milp",
            "loss": config.output_loss, "base": precision_label(base),
            "precisions": [precision_label(p) for p in precisions],
            "budgets": dict(budgets), "max_degradation": cfg.max_degradation,
            "ties": [[layers[i] for i in g] for g in problem.ties],
            "choice": {n: precision_label(precisions[choice[i]]) for i, n in enumerate(layers)},
            "base_loss": base_loss, "predicted_degradation": problem.predicted(choice),
            "measured_degradation": measured, "costs": totals, "seconds": timings,
            "cache": {"folder": cache.folder, "hits": len(cache.hits), "misses": len(cache.misses)},
            # what the recipe's steps (e.g. parallel AdaQuant) recorded for each candidate precision
            "candidates": {precision_label(p): candidate_records[p] for p in precisions},
            "sensitivity": {n: {precision_label(p): float(table[i, j]) for j, p in enumerate(precisions)}
                            for i, n in enumerate(layers)}}
