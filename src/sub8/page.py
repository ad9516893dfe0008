"""report.html: report.json as a page a person reads, one self-contained file (inline SVG
figures and style, no network), written beside report.json by every run."""

from __future__ import annotations

import collections
from html import escape

from . import plot
from .analyzer import bits_text
from .table import fmt_bits

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; }
svg.figure { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
details { margin: 0.6em 0; }
"""

METRIC_LABELS = {"top1_agreement_confident": "confident top-1 agreement", "top1_agreement": "top-1 agreement",
                 "top5_agreement": "top-5 agreement", "kl": "KL", "accuracy": "accuracy",
                 "cosine_similarity": "cosine similarity", "relative_mse": "relative MSE"}


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{escape(_num(c))}</td>' if i in numeric else f"<td>{escape(str(c))}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_keys(metrics: dict) -> list[str]:
    return [k for k in METRIC_LABELS if k in metrics]


def _summary(report: dict) -> str:
    c = report.get("config", {})
    model = report.get("model", {}).get("spec", report.get("model_kind", "model"))
    recipe = ",".join(c.get("steps") or []) or c.get("pipeline", "")
    rows = [["model", model], ["kind", report.get("model_kind", "")], ["steps", recipe],
            ["bits", f"W{fmt_bits(c.get('w_bits'))}A{fmt_bits(c.get('a_bits'))}, first/last "
                     f"{fmt_bits(c.get('first_last_bits'))}"],
            ["ranges", c.get("ranges", "")], ["seed", report.get("seed", "")],
            ["calibration samples", report.get("calibration", {}).get("n_images", "")],
            ["weight size", f"{100 * report['size']['ratio']:.2f}% of float32" if "size" in report else "n/a"],
            ["sub8", report.get("versions", {}).get("sub8", "")], ["torch", report.get("versions", {}).get("torch", "")]]
    out = ["<h2>Run</h2>", _table(["", ""], rows)]
    if "metrics" in report:
        m = report["metrics"]
        keys = _metric_keys(m["quantized"])
        out.append(_table(["model"] + [METRIC_LABELS[k] for k in keys],
                          [[name] + [m[name].get(k) for k in keys] for name in ("float", "quantized")],
                          numeric=set(range(1, len(keys) + 1))))
    return "\n".join(out)


def _layers(report: dict) -> str:
    layers = report.get("layers", [])
    if not layers:
        return ""
    rows = [[i["name"], i.get("kind", ""), fmt_bits(i["w_bits"]), fmt_bits(i["a_bits"]), i.get("params"),
             i.get("macs")] for i in layers]
    kinds = collections.Counter(f"W{fmt_bits(i['w_bits'])}A{fmt_bits(i['a_bits'])}" for i in layers)
    return "\n".join(["<h2>Bits per layer</h2>",
                      f"<p>{len(layers)} layers: " + ", ".join(f"{n} × {k}" for k, n in kinds.most_common()) + "</p>",
                      plot.bits_figure(layers),
                      "<details><summary>every layer</summary>",
                      _table(["layer", "kind", "weight bits", "input bits", "parameters", "MACs"], rows, {4, 5}),
                      "</details>"])


def _steps(report: dict) -> str:
    steps = report.get("steps", [])
    keys = []
    for s in steps:
        keys = _metric_keys(s.get("metrics") or {}) or keys
    rows = [[s["name"], s.get("seconds"), s.get("peak_rss_mb")] + [(s.get("metrics") or {}).get(k) for k in keys]
            for s in steps]
    out = ["<h2>Steps</h2>",
           _table(["step", "seconds", "peak RSS (MB)"] + [METRIC_LABELS[k] for k in keys], rows,
                  set(range(1, 3 + len(keys))))]
    measured = [k for k in keys if any((s.get("metrics") or {}).get(k) is not None for s in steps)]
    shown = [k for k in ("top1_agreement_confident", "cosine_similarity", "accuracy") if k in measured][:1] + \
        [k for k in ("kl", "relative_mse") if k in measured]
    if shown:
        out.append(plot.steps_figure(steps, [(k, METRIC_LABELS[k]) for k in shown]))
    return "\n".join(out)


def _allocation(report: dict) -> str:
    a = report.get("allocate")
    if not a:
        return ""
    chosen = collections.Counter(a["choice"].values())
    out = ["<h2>Bit allocation</h2>",
           f"<p>{escape(a['solver'])} over {escape(a['loss'])} sensitivities: "
           + ", ".join(f"{n} × {escape(p)}" for p, n in sorted(chosen.items())) + "</p>"]
    if a.get("sensitivity"):
        out.append(plot.sensitivity_figure(a["sensitivity"], a["choice"]))
    out.append(plot.degradation_figure(a["predicted_degradation"], a["measured_degradation"], a["loss"]))
    return "\n".join(out)


def _coverage(report: dict) -> str:
    coverage = report.get("coverage") or {}
    if not coverage:
        return ""
    left = coverage.get("float", [])
    out = ["<h2>Coverage</h2>",
           f"<p>{100 * coverage['params']['share']:.2f}% of parameters and "
           f"{100 * coverage['macs']['share']:.2f}% of multiply-accumulates quantized.</p>"]
    if left:
        out.append(_table(["where", "op", "share of MACs", "reason"],
                          [[e["where"], e["op"], e["macs_share"], e["reason"]] for e in left], {2}))
    return "\n".join(out)


def _inspect(report: dict) -> str:
    ins = report.get("inspect")
    if not ins:
        return ""
    base = ins["baseline"]
    keys = _metric_keys(base["metrics"])
    out = ["<h2>Inspect: the layers that hurt</h2>",
           f"<p>Every site ranked on {ins['samples']} samples by what the quantized model gains when only "
           f"that site is float ({escape(ins['loss'])} {_num(base['loss'])} before); the worst measured again, "
           f"with their fixes, on {ins['fresh_samples']} other samples. A fix is measured in the finished "
           f"model (the raised part gets a round-to-nearest grid); rerunning with the line refits it.</p>"]
    rows = []
    for c in ins["culprits"]:
        s = c.get("suggestion") or {}
        m = s.get("metrics") or {}
        f = c["fresh"]
        rows.append([c["rank"], c["name"], bits_text(c["bits"]), c["restore_gain"], f["restore_gain"],
                     f["restore_gain_se"], "yes" if c["confirmed"] else "no: noise",
                     c["share"].get("weight"), c["share"].get("input"), c["sqnr_db"],
                     s.get("command_line", ""), s.get("loss"), s.get("recovered"), s.get("size_ratio")]
                    + [m.get(k) for k in keys])
    out.append(_table(["rank", "site", "bits", "gain (ranking)", "gain (other samples)", "± SE", "confirmed",
                       "share: weights", "share: input", "SQNR dB", "suggested", f"{ins['loss']} after",
                       "recovered", "size ratio"] + [METRIC_LABELS[k] + " after" for k in keys], rows,
                      {0, 3, 4, 5, 7, 8, 9, 11, 12, 13} | set(range(14, 14 + len(keys)))))
    before = next((c["suggestion"]["metrics_before"] for c in ins["culprits"] if c.get("suggestion")), None)
    if before is not None:
        out.append(f"<p>Before any fix, on the other samples: size ratio {_num(base['size_ratio'])}, "
                   + ", ".join(f"{METRIC_LABELS[k]} {_num(before[k])}" for k in keys) + ".</p>")
    out.append(plot.culprits_figure(ins["sites"]))
    out.append(plot.error_growth_figure(ins["sites"]))
    for i, c in enumerate(ins["culprits"]):
        if c.get("weight_ranges") or (c.get("input") or {}).get("histogram"):
            out.append(plot.histogram_figure(c, i))
    return "\n".join(out)


def document(title: str, sections: list[str]) -> str:
    body = "\n".join(s for s in sections if s)
    # The script only counts the figures once the page has loaded (tests read it from the DOM).
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n{body}\n"
            "<script>document.body.dataset.figures = document.querySelectorAll('svg.figure').length;</script>"
            "\n</body></html>\n")


def report_page(report: dict) -> str:
    """report.json as HTML."""
    model = report.get("model", {}).get("spec", "model")
    return document(f"sub8 report: {model}", [_summary(report), _inspect(report), _steps(report),
                                              _layers(report), _allocation(report), _coverage(report)])


def pareto_page(result: dict, svg: str, table_lines: list[str]) -> str:
    """`sub8 pareto`'s front: its figure and its table."""
    header = [h.strip() for h in table_lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table_lines[2:]]
    return document(f"sub8 Pareto front: {result.get('model', 'model')}",
                    [svg, _table(header, rows)])
