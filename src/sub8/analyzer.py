"""Find the layer that hurts (`sub8 inspect`, `--inspect`): where the quantized model's error
comes from, and which one-line change fixes most of it.

For every quantized site (a layer's weights and input, an attention or junction operand, an
embedding table), on a few samples:
- the error of its output inside the quantized model against the float model (relative MSE,
  SQNR): how the error grows along the network;
- its own share: the output loss (the run's KL or MSE) with only that site quantized, its
  weights and its input separately;
- the gain from restoring only that site to float in the quantized model: the culprits' ranking.
For the worst few, candidate fixes (the weights or the input raised to 8 bits or to float) are
measured in the finished model, and the cheapest that recovers most of the gain is offered as a
ready `--layer-bits` line, with its metrics and size.

Each measurement after a site reruns only the network from that site on (allocate.sensitivity's
SuffixRunner); every other value comes from one recorded float and one recorded quantized run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import progress
from .allocate.sensitivity import SuffixRunner
from .calibrate.ranges import ActivationObserver
from .errors import Sub8Error
from .evaluate import per_sample_loss
from .prepare.prepare import weight_symmetric
from .prepare.requantize import QuantTensor
from .quant.embedding import QuantEmbedding
from .quant.layers import QuantInput, QuantLayer
from .quant.quantizer import Quantizer
from .quant.ranges import estimate
from .quant.token_mask import real_tokens
from .table import fmt_bits


@dataclass
class InspectSettings:
    """How much to inspect: `samples` from the data to rank the sites on (every measurement after
    a site costs the rest of the network on them), and the `top` worst sites' gains and fixes
    measured again on `confirm` other samples."""
    samples: int = 32
    top: int = 3
    confirm: int = 64  # other samples the worst sites are measured again on


def split_samples(data: torch.Tensor, n: int, confirm: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n samples to rank the sites on, up to `confirm` others to measure the worst again on),
    chosen at random by `seed` (a folder read in order is sorted by class), each in the data's
    order; no others (None) when the data has no more than n."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    ranked, rest = order[:n].sort().values, order[n:n + confirm].sort().values
    return data[ranked], (data[rest] if len(rest) else None)


RECOVERS = 0.8       # a fix is offered when it recovers this share of the float-restore gain
HISTOGRAM_BINS = 40
INPUT_SAMPLE = 2 ** 16  # input values kept per site (histograms, an 8-bit range for a fix)


def site_kind(m: nn.Module) -> str | None:
    """layer, embedding, junction or operand; None for a module that quantizes nothing."""
    for cls, kind in ((QuantLayer, "layer"), (QuantEmbedding, "embedding"), (QuantTensor, "junction"),
                      (QuantInput, "operand")):
        if isinstance(m, cls):
            return kind
    return None


def sites_of(module: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """{name: (kind, module)} of every quantized site (site_kind)."""
    return {name: (site_kind(m), m) for name, m in module.named_modules() if site_kind(m) is not None}


def parts_of(kind: str) -> tuple[str, ...]:
    """What a site quantizes: its weights, its input, or both."""
    return {"layer": ("weight", "input"), "embedding": ("weight",)}.get(kind, ("input",))


def _quantizer(m: nn.Module, part: str) -> Quantizer:
    return m.weight_quantizer if part == "weight" else m.input_quantizer


@contextlib.contextmanager
def swapped(root: nn.Module, name: str, module: nn.Module):
    """`module` in place of root's submodule `name` for the duration of the block."""
    old = root.get_submodule(name)
    root.set_submodule(name, module)
    try:
        yield
    finally:
        root.set_submodule(name, old)


@contextlib.contextmanager
def channels_last(*modules: nn.Module):
    """4-D weights in channels-last layout for the block (restored after): with channels-last
    inputs, CPU convolutions (depthwise ones most) run about twice as fast. The values are the
    same; the summation order inside a convolution is not, so an output can differ in its last
    bits and a fake-quantized activation on a grid boundary can round the other way."""
    saved = []
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                saved.append((t, t.data))
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    _forget_weights(modules)
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data
        _forget_weights(modules)


def _forget_weights(modules) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, QuantLayer):
                m._weight_cache = None


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def float_copy(reference: nn.Module) -> nn.Module:
    """A copy of the prepared float model with every quantizer off for good."""
    module = copy.deepcopy(reference).eval()
    for q in module.modules():
        if isinstance(q, Quantizer):
            q.bypass = True
    return module


def only_part(q_site: nn.Module, f_site: nn.Module, part: str, kind: str) -> nn.Module:
    """The site with only `part` quantized: its weights (the quantized model's weight, bias and
    grid; those were fitted together) with a float input, or the float weight and bias with
    the quantized model's input grid."""
    if len(parts_of(kind)) == 1:
        return q_site
    if part == "weight":
        site = copy.copy(q_site)  # shares the quantized model's tensors; only the input is float
        site._modules = {**q_site._modules, "input_quantizer": _off(q_site.input_quantizer)}
    else:
        site = copy.copy(f_site)
        site._modules = {**f_site._modules, "input_quantizer": q_site.input_quantizer}
    return site


def _off(q: Quantizer) -> Quantizer:
    q = copy.deepcopy(q)
    q.bypass = True
    return q


def _bits(m: nn.Module, part: str):
    q = _quantizer(m, part)
    return q.bits if q.enabled else None


def _site_bits(kind: str, m: nn.Module) -> dict:
    return {part: _bits(m, part) for part in parts_of(kind)}


class _Recorder:
    """Forward hooks that keep (or compare) each site's outputs, in call order."""

    def __init__(self, sites: dict, kinds: dict, reference: dict | None = None):
        self.outputs = {name: [] for name in sites}
        self.order: list[str] = []
        self.reference = reference
        self.err = dict.fromkeys(sites, 0.0)
        self.ref = dict.fromkeys(sites, 0.0)
        self.handles = [m.register_forward_hook(self._hook(name, kinds[name])) for name, m in sites.items()]

    def _hook(self, name, kind):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor):
                return
            out = out.detach()
            out = module.real(out) if kind in ("operand", "junction") else real_tokens(out)
            if name not in self.order:
                self.order.append(name)
            if self.reference is None:  # a copy: an in-place activation after the site changes `out`
                self.outputs[name].append(out.clone())
                return
            k = len(self.outputs[name])
            self.outputs[name].append(None)  # only the count: the float run keeps the values
            f = self.reference[name][k].double()
            self.err[name] += ((out.double() - f) ** 2).sum().item()
            self.ref[name] += (f ** 2).sum().item()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _record(module, x, sites, kinds, reference=None, observers=None):
    """One run of `module` on x, recorded for suffix reruns, with its sites' outputs (and their
    inputs' samples, with `observers`)."""
    recorder = _Recorder(sites, kinds, reference)
    for name, obs in (observers or {}).items():
        sites[name].observer = obs
    try:
        runner = SuffixRunner(module, x)
        runner.output  # a model without a graph runs here, under the hooks
    finally:
        recorder.close()
        for name in observers or {}:
            sites[name].observer = None
    return runner, recorder


def _histogram(values: torch.Tensor, lo: float | None = None, hi: float | None = None) -> dict:
    values = values.double()
    a, b = values.min().item(), values.max().item()
    if lo is not None:
        a, b = min(a, lo), max(b, hi)
    if b <= a:
        b = a + 1e-12
    counts = torch.histc(values, bins=HISTOGRAM_BINS, min=a, max=b)
    edges = torch.linspace(a, b, HISTOGRAM_BINS + 1)
    return {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}


def _clip_range(q: Quantizer) -> tuple[float, float]:
    step, zero = q.step.detach().double().flatten(), q.zero_point.detach().double().round().flatten()
    return (((q.qmin - zero) * step).min().item(), ((q.qmax - zero) * step).max().item())


def _weight_ranges(m: nn.Module) -> dict:
    """Per output channel (or row) weight ranges of the float weight, and how far they spread."""
    rows = m.layer.weight.detach().reshape(m.layer.weight.shape[0], -1).double()
    ranges = rows.max(dim=1).values - rows.min(dim=1).values
    median = ranges.median().item()
    return {"channels": len(ranges), "max": ranges.max().item(), "median": median,
            "spread": ranges.max().item() / median if median > 0 else None, "histogram": _histogram(ranges)}


def _input_values(q_site: nn.Module, obs: ActivationObserver | None) -> dict | None:
    if obs is None or not obs.samples:
        return None
    values = obs.values()
    q = q_site.input_quantizer
    out = {"min": obs.lo, "max": obs.hi}
    if q.enabled and q.initialized:
        lo, hi = _clip_range(q)
        out.update({"clip_lo": lo, "clip_hi": hi, "clipped": ((values < lo) | (values > hi)).double().mean().item(),
                    "histogram": _histogram(values, lo, hi)})
    else:
        out["histogram"] = _histogram(values)
    return out


def _raised(q_site, f_site, raise_to: dict, config, observer) -> nn.Module:
    """The site with some parts raised (`raise_to[part]`: 8 or None for float) in the finished
    model: a raised weight starts again from the float weight and bias, with an 8-bit grid
    from the config's range method; a raised input takes an 8-bit grid from the inputs seen
    in the quantized model (round to nearest: a rerun with the line refits it)."""
    m = copy.deepcopy(q_site)
    if "weight" in raise_to:
        m.layer.load_state_dict(f_site.layer.state_dict())
        q = m.weight_quantizer
        q.bits, q.bypass = raise_to["weight"], False
        if q.bits is not None:
            q.symmetric = weight_symmetric(config, q.bits)
            rows = m.layer.weight.detach().reshape(q.step.shape[0], -1)
            q.set_range(*estimate(rows, config.ranges, q.bits, q.symmetric, config.percentile, weights=True))
    if "input" in raise_to:
        q = m.input_quantizer
        q.bits, q.bypass = raise_to["input"], False
        if q.bits is not None:
            q.symmetric = config.a_symmetric
            values = observer.values().to(q.step.device)[None]
            q.set_range(*estimate(values, config.ranges, q.bits, q.symmetric, config.percentile))
    return m


def candidate_fixes(kind: str, bits: dict) -> list[dict]:
    """{part: 8 or None (float)} changes to try for a site, cheapest first: one part to 8 bits,
    then to float; then both parts. Only changes that raise something."""
    options = {part: ([8] if b is not None and b < 8 else []) + ([None] if b is not None else [])
               for part, b in bits.items()}
    singles = [{part: v} for part, vs in options.items() for v in vs]
    both = []
    if len(options) == 2 and all(options.values()):
        both = [dict(zip(options, pair)) for pair in ((8, 8), (None, None)) if all(
                v in options[p] for p, v in zip(options, pair))]

    def cost(fix):  # weight bits weigh more than activation bits: they are stored
        return sum((32 if v is None else v) - (bits[p] or 32) for p, v in fix.items() if p == "weight") * 4 + \
            sum((32 if v is None else v) - (bits[p] or 32) for p, v in fix.items() if p == "input")
    return sorted(singles + both, key=cost)


def layer_bits_line(name: str, kind: str, bits: dict, fix: dict) -> str | None:
    """The `--layer-bits` value that applies a layer's fix (None for other kinds)."""
    if kind != "layer":
        return None
    new = {**bits, **fix}
    return f"{name}={fmt_bits(new['weight'])},{fmt_bits(new['input'])}"


GLOBAL_FIXES = {"junction": "--no-requantize", "operand": "--no-attention", "embedding": "--embedding-bits float"}


@torch.no_grad()
def inspect(quantized, float_reference: nn.Module, data: torch.Tensor, config, compare, size_ratio,
            top: int = 3, batch: int | None = None, fresh: torch.Tensor | None = None) -> dict:
    """The analysis of `quantized` (a PreparedModel) against `float_reference` (the prepared
    float model: the run's `prepared.reference`, or a fresh prepare of the float model) on
    `data`; the worst sites' gains and fixes are measured again on `fresh` samples (others than
    `data`; without them, on `data`). `compare(float_out, quant_out)` gives the run's metrics;
    `size_ratio()` the size of `quantized` as it stands (sites swapped in included)."""
    start = time.perf_counter()
    batch = batch or config.forward_batch
    device = next(quantized.module.parameters()).device
    qm, fm = quantized.module.eval(), float_copy(float_reference).to(device)
    q_sites = sites_of(qm)
    f_sites = sites_of(fm)
    if set(q_sites) != set(f_sites):
        odd = sorted(set(q_sites) ^ set(f_sites))
        raise Sub8Error(f"the float model does not fit the quantized one: sites {', '.join(odd[:5])} differ")
    kinds = {n: k for n, (k, _) in q_sites.items()}
    q_mods = {n: m for n, (_, m) in q_sites.items()}
    f_mods = {n: m for n, (_, m) in f_sites.items()}
    active = {n: _site_bits(kinds[n], m) for n, m in q_mods.items()}
    active = {n: b for n, b in active.items() if any(v is not None for v in b.values())}

    with channels_last(qm, fm):
        return _inspect(qm, fm, q_mods, f_mods, kinds, active, data, fresh, config, compare, size_ratio, top,
                        batch, start)


def _inspect(qm, fm, q_mods, f_mods, kinds, active, data, fresh, config, compare, size_ratio, top, batch,
             start) -> dict:
    kind_loss, device, names = config.output_loss, next(qm.parameters()).device, list(active)
    generator = torch.Generator().manual_seed(config.seed)
    n_batches = -(-len(data) // batch)
    observers = {n: ActivationObserver(n, max(1, INPUT_SAMPLE // n_batches), generator)
                 for n in names if "input" in parts_of(kinds[n]) and active[n]["input"] is not None}
    share = {n: {p: 0.0 for p in parts_of(kinds[n]) if active[n][p] is not None} for n in names}
    alone = {n: {p: only_part(q_mods[n], f_mods[n], p, kinds[n]) for p in share[n]} for n in names}
    restored = {n: [] for n in names}  # per-sample losses: the gains' sampling error
    base, order = [], []
    err, ref = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    float_out, quant_out = [], []
    per_batch = sum(len(share[n]) + 1 for n in names)
    with progress.bar(per_batch * n_batches, "inspect: one site at a time", "run") as shown:
        for i in range(0, len(data), batch):
            x = _layout(data[i:i + batch].to(device))
            f_run, f_rec = _record(fm, x, f_mods, kinds)
            q_run, q_rec = _record(qm, x, q_mods, kinds, reference=f_rec.outputs, observers=observers)
            f_y, q_y = f_run.output, q_run.output
            float_out.append(f_y.float().cpu())
            quant_out.append(q_y.float().cpu())
            base.append(per_sample_loss(kind_loss, q_y.float().cpu(), f_y.float().cpu()))
            for n in names:
                err[n] += q_rec.err[n]
                ref[n] += q_rec.ref[n]
            order = order or [n for n in f_rec.order if n in active]
            del f_rec, q_rec
            target = f_y.float().cpu()
            for n in names:
                for part in share[n]:  # only this part of this site quantized
                    with swapped(fm, n, alone[n][part]):
                        out = f_run.from_layer(n)
                    share[n][part] += per_sample_loss(kind_loss, out.float().cpu(), target).sum().item()
                    shown.update(1)
                with swapped(qm, n, f_mods[n]):  # all quantized but this site
                    out = q_run.from_layer(n)
                restored[n].append(per_sample_loss(kind_loss, out.float().cpu(), target))
                shown.update(1)
            del f_run, q_run
    count = len(data)
    base = torch.cat(base)
    base_loss = base.mean().item()
    float_out, quant_out = torch.cat(float_out), torch.cat(quant_out)
    order += [n for n in names if n not in order]
    rows = []
    for k, n in enumerate(order):
        rel = err[n] / ref[n] if ref[n] > 0 else None
        gains = base - torch.cat(restored[n])  # paired: the same samples with and without the site
        rows.append({"name": n, "kind": kinds[n], "position": k, "bits": active[n],
                     "relative_mse": rel, "sqnr_db": (-10 * math.log10(rel) if rel else None),
                     "share": {p: v / count for p, v in share[n].items()}, "restore_gain": gains.mean().item(),
                     "restore_gain_se": standard_error(gains)})
    ranked = sorted(rows, key=lambda r: -r["restore_gain"])
    for rank, r in enumerate(ranked, 1):
        r["rank"] = rank
    worst = [r for r in ranked[:top] if r["restore_gain"] > 0]  # restoring the others gains nothing
    culprits = _fixes(worst, qm, fm, q_mods, f_mods, observers, data if fresh is None else fresh, batch, config,
                      compare, size_ratio)
    baseline = {"loss": base_loss, "loss_se": standard_error(base), "metrics": compare(float_out, quant_out),
                "size_ratio": size_ratio()}
    return {"samples": count, "fresh_samples": len(data) if fresh is None else len(fresh), "loss": kind_loss,
            "baseline": baseline, "sites": rows, "culprits": culprits, "seconds": time.perf_counter() - start}


def _fixes(worst, qm, fm, q_mods, f_mods, observers, data, batch, config, compare, size_ratio) -> list[dict]:
    """Measure each culprit's gain from float again, and its candidate fixes, on `data`: samples
    the ranking did not see, so that a gain that only won the ranking by the samples' chance
    shows as such. The cheapest fix that recovers RECOVERS of that gain is suggested."""
    device = next(qm.parameters()).device
    plans = []
    for r in worst:
        n, kind = r["name"], r["kind"]
        if kind == "layer":
            fixes = [(fix, {n: _raised(q_mods[n], f_mods[n], fix, config, observers.get(n))})
                     for fix in candidate_fixes(kind, r["bits"])
                     if "input" not in fix or fix["input"] is None or n in observers]
        else:  # the global option that turns this kind of site off: every site of the kind float
            fixes = [({"option": GLOBAL_FIXES[kind]}, {s: f_mods[s] for s in q_mods if site_kind(q_mods[s]) == kind})]
        plans.append((r, [({"restore": True}, {n: f_mods[n]})] + fixes))
    if not plans:
        return []
    losses = [[[] for _ in c] for _, c in plans]
    outs = [[[] for _ in c] for _, c in plans]
    base, float_out, quant_out = [], [], []
    total = sum(len(c) for _, c in plans) * -(-len(data) // batch)
    with progress.bar(total, "inspect: culprits on fresh samples", "run") as shown:
        for i in range(0, len(data), batch):
            x = _layout(data[i:i + batch].to(device))
            target = fm(x).float().cpu()
            run = SuffixRunner(qm, x)
            float_out.append(target)
            quant_out.append(run.output.float().cpu())
            base.append(per_sample_loss(config.output_loss, quant_out[-1], target))
            for j, (r, cands) in enumerate(plans):
                for c, (_, replace) in enumerate(cands):
                    with contextlib.ExitStack() as stack:
                        for s, m in replace.items():
                            stack.enter_context(swapped(qm, s, m))
                        out = run.from_layer(r["name"]) if len(replace) == 1 else qm(x)
                    out = out.float().cpu()
                    losses[j][c].append(per_sample_loss(config.output_loss, out, target))
                    outs[j][c].append(out)
                    shown.update(1)
            del run
    base, float_out = torch.cat(base), torch.cat(float_out)
    before = compare(float_out, torch.cat(quant_out))  # the same for every culprit
    result = []
    for j, (r, cands) in enumerate(plans):
        n = r["name"]
        restored = base - torch.cat(losses[j][0])
        gain = restored.mean().item()
        measured = []
        for c, (fix, replace) in enumerate(cands[1:], 1):
            with contextlib.ExitStack() as stack:
                for s, m in replace.items():
                    stack.enter_context(swapped(qm, s, m))
                ratio = size_ratio()
            loss = torch.cat(losses[j][c]).mean().item()
            measured.append({"fix": fix, "loss": loss, "size_ratio": ratio, "index": c,
                             "recovered": (base.mean().item() - loss) / gain if gain > 0 else None})
        # the cheapest fix that recovers most of a real gain; without one, the most effective
        pick = next((m for m in measured if m["recovered"] is not None and m["recovered"] >= RECOVERS),
                    min(measured, key=lambda m: m["loss"]) if measured else None)
        if gain <= 0:
            for m in measured:
                m["recovered"] = None
        entry = {k: r[k] for k in ("name", "kind", "bits", "rank", "restore_gain", "restore_gain_se", "share",
                                   "sqnr_db", "relative_mse")}
        entry["fresh"] = {"samples": len(base), "loss": base.mean().item(), "restore_gain": gain,
                          "restore_gain_se": standard_error(restored)}
        entry["confirmed"] = significant(entry["fresh"])
        if r["kind"] == "layer":
            entry["weight_ranges"] = _weight_ranges(f_mods[n])
        entry["input"] = _input_values(q_mods[n], observers.get(n)) if "input" in r["bits"] else None
        entry["candidates"] = [{k: v for k, v in m.items() if k != "index"} | {"fix": _fix_text(m["fix"])}
                               for m in measured]
        if pick is not None:
            fix = pick["fix"]
            line = layer_bits_line(n, r["kind"], r["bits"], fix) if "option" not in fix else None
            entry["suggestion"] = {"layer_bits": line,
                                   "command_line": f"--layer-bits '{line}'" if line else fix["option"],
                                   "loss": pick["loss"], "recovered": pick["recovered"],
                                   "size_ratio": pick["size_ratio"],
                                   "metrics": compare(float_out, torch.cat(outs[j][pick["index"]])),
                                   "metrics_before": before}
        result.append(entry)
    return result


def standard_error(values: torch.Tensor) -> float | None:
    """The standard error of the mean of per-sample values (None for one sample)."""
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else None


def significant(entry: dict) -> bool:
    """A restore gain at least twice its standard error: not the samples' chance."""
    se = entry.get("restore_gain_se")
    return se is None or entry["restore_gain"] > 2 * se


def bits_text(bits: dict) -> str:
    """A site's bits per part, as W8 A8 (weights, input)."""
    return " ".join(f"{'W' if part == 'weight' else 'A'}{fmt_bits(b)}" for part, b in bits.items())


def _fix_text(fix: dict) -> str:
    if "option" in fix:
        return fix["option"]
    return ", ".join(f"{part} {fmt_bits(v)}" for part, v in fix.items())


def summary(record: dict, shown: int | None = None) -> list[str]:
    """The inspect results in a few terminal lines: the culprits, worst first, with their numbers
    and the line that fixes each."""
    base = record["baseline"]
    loss = record["loss"]
    metric = "cosine_similarity" if "cosine_similarity" in base["metrics"] else "top1_agreement"
    label = metric.replace("_", " ")
    lines = [f"inspect ({record['seconds']:.1f} s): ranked on {record['samples']} samples ({loss} {base['loss']:.4g}, "
             f"{label} {base['metrics'][metric]:.3f}, size {100 * base['size_ratio']:.2f}%), the worst measured "
             f"again on {record['fresh_samples']} others; the culprits, worst first:"]
    if not record["culprits"]:
        lines.append("  no site gains anything when restored to float")
    for c in record["culprits"][:shown]:
        bits = bits_text(c["bits"])
        share = ", ".join(f"{p} {v:.3g}" for p, v in c["share"].items())
        sqnr = f", SQNR {c['sqnr_db']:.1f} dB" if c["sqnr_db"] is not None else ""
        f = c["fresh"]
        verdict = "" if c["confirmed"] else " -- not confirmed: within the samples' noise"
        lines.append(f"  {c['rank']}. {c['name']} ({c['kind']} {bits}): float gains {f['restore_gain']:.3g} "
                     f"± {f['restore_gain_se'] or 0:.2g} of {f['loss']:.3g}{verdict}; alone {share}{sqnr}")
        s = c.get("suggestion")
        if s:
            m, before = s["metrics"], s["metrics_before"]
            recovered = f" ({100 * s['recovered']:.0f}% of the gain)" if c["confirmed"] else ""
            lines.append(f"     fix: {s['command_line']}  -> {loss} {f['loss']:.3g} -> {s['loss']:.3g}{recovered}, "
                         f"{label} {before[metric]:.3f} -> {m[metric]:.3f}, size {100 * base['size_ratio']:.2f}% -> "
                         f"{100 * s['size_ratio']:.2f}%")
    return lines
