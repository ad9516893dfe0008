"""Bit allocation by integer programming: the per-layer steps before it in the pipeline (the
recipe) run once per candidate precision, each candidate a work item for the run's executor."""

from __future__ import annotations

import glob
from dataclasses import dataclass, replace

import torch

from ..allocate.allocation import AllocationConfig, allocate as run_allocation, layer_states
from ..cache import DiskCache
from ..registry import RunContext, get, recipe_settings, register


@dataclass
class CandidateWork:
    """One candidate precision's recipe: a fresh prepared model at that uniform precision."""
    model: torch.nn.Module
    adapter: object
    calib: torch.Tensor
    config: object
    precision: tuple
    first_last: tuple[str, ...]   # layer name patterns that take the precision too


def run_candidate(work: CandidateWork) -> dict:
    """{"states": {layer: state}, "records": {step: record}} after the recipe at one precision."""
    c = work.config
    layer_bits = {**{name: work.precision for name in work.first_last}, **c.layer_bits}
    config = replace(c, w_bits=work.precision[0], a_bits=work.precision[1], layer_bits=layer_bits)
    prepared = work.adapter.prepare(work.model, work.calib[:1], config)
    ctx = RunContext(config, prepared, work.calib, model=work.model, adapter=work.adapter, candidate=True)
    records = {name: get(name).run(ctx) for name in config.steps}
    return {"states": layer_states(prepared), "records": {n: r for n, r in records.items() if r is not None}}


@register("allocate", settings=AllocationConfig, settings_key="allocation")
def allocate(ctx) -> dict:
    """One precision per layer by integer programming over per-layer sensitivities."""
    c = ctx.config
    first_last = ()
    if c.allocation.first_last:  # candidates at `precision` for them too (name patterns, escaped)
        first_last = tuple(glob.escape(ctx.prepared.layers[i].name) for i in (0, -1))
    recipe_config = replace(c, steps=ctx.recipe)

    def run_candidates(precisions):
        items = [CandidateWork(ctx.model, ctx.adapter, ctx.calib, recipe_config, p, first_last) for p in precisions]
        return ctx.executor.map(run_candidate, items)

    return run_allocation(ctx.model, ctx.prepared, ctx.calib.to(c.device), c, ctx.recipe, run_candidates,
                          DiskCache(c.cache_dir, read=not ctx.fresh), recipe_settings(c, ctx.recipe),
                          executor=ctx.executor)
