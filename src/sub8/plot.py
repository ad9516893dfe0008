"""The report's figures, drawn with matplotlib and returned as inline SVG (text kept as text,
no external fonts or scripts), so that report.html is one self-contained file."""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written out

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "sub8", "font.size": 9,
                     "axes.spines.top": False, "axes.spines.right": False})

WIDE, TALL = (9.0, 3.2), (9.0, 4.2)
BLUE, RED, GREY, ORANGE = "#1f77b4", "#d62728", "#7f7f7f", "#ff7f0e"


def to_svg(fig, figure_id: str) -> str:
    """The figure as an <svg> element with `figure_id`, and the figure closed."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg"):], flags=re.S)
    return text.replace("<svg ", f'<svg id="{figure_id}" class="figure" role="img" ', 1)


def _bits_value(b):
    return 32 if b is None else b


def bits_figure(layers: list[dict]) -> str:
    """Weight and input bits of each layer along the network (float drawn at the top)."""
    fig, ax = plt.subplots(figsize=WIDE)
    x = range(len(layers))
    ax.step(x, [min(_bits_value(i["w_bits"]), 9) for i in layers], where="mid", color=BLUE, label="weights")
    ax.step(x, [min(_bits_value(i["a_bits"]), 9) for i in layers], where="mid", color=ORANGE,
            linestyle="--", label="inputs")
    ax.set_yticks([2, 3, 4, 5, 6, 7, 8, 9], ["2", "3", "4", "5", "6", "7", "8", "float"])
    ax.set_ylim(1.5, 9.5)
    ax.set_xlabel("layer, in the order the model runs them")
    ax.set_ylabel("bits")
    _layer_ticks(ax, [i["name"] for i in layers])
    ax.legend(loc="lower right", frameon=False)
    ax.set_title("Bits per layer")
    return to_svg(fig, "fig-bits")


def _layer_ticks(ax, names: list[str], most: int = 24) -> None:
    step = max(1, math.ceil(len(names) / most))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=60, ha="right", fontsize=7)


def sensitivity_figure(sensitivity: dict[str, dict[str, float]], choice: dict[str, str]) -> str:
    """The sensitivity table (layer x precision: loss increase) as a heat map, with each
    layer's allocated precision outlined."""
    layers = list(sensitivity)
    precisions = sorted({p for row in sensitivity.values() for p in row})
    values = [[max(sensitivity[n].get(p, float("nan")), 1e-12) for n in layers] for p in precisions]
    positive = [v for row in values for v in row if v == v and v > 1e-12]
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + 0.35 * len(precisions)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r", interpolation="nearest",
                      norm=LogNorm(vmin=min(positive, default=1e-6), vmax=max(positive, default=1.0)))
    ax.set_yticks(range(len(precisions)), precisions)
    _layer_ticks(ax, layers)
    for j, n in enumerate(layers):
        if choice.get(n) in precisions:
            i = precisions.index(choice[n])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=BLUE, linewidth=1.2))
    fig.colorbar(image, ax=ax, label="loss increase, that layer alone", pad=0.01)
    ax.set_title("Sensitivity: each layer alone at each precision (outlined: allocated)")
    return to_svg(fig, "fig-sensitivity")


def degradation_figure(predicted: float, measured: float, loss: str) -> str:
    """The integer program's predicted degradation (the sum of the chosen layers' entries)
    beside the measured one."""
    fig, ax = plt.subplots(figsize=(4.5, 2.4))
    ax.barh([0, 1], [predicted, measured], color=[GREY, BLUE])
    ax.set_yticks([0, 1], ["predicted (sum)", "measured"])
    ax.set_xlabel(f"{loss} increase over the base precision")
    ax.set_title("Allocation: predicted vs measured")
    return to_svg(fig, "fig-degradation")


def steps_figure(steps: list[dict], panels: list[tuple[str, str]]) -> str:
    """The metrics after each step (the ablation): one panel per (metric key, label)."""
    named = [s for s in steps if s.get("metrics")]
    names = [s["name"] for s in named]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.0), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        values = [s["metrics"].get(metric) for s in named]
        ax.plot(range(len(names)), [v if v is not None else float("nan") for v in values], marker="o", color=BLUE)
        for i, v in enumerate(values):
            if v is not None:
                ax.annotate(f"{v:.3g}", (i, v), textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel(label)
    fig.suptitle("After each step", fontsize=9)
    return to_svg(fig, "fig-steps")


def error_growth_figure(sites: list[dict]) -> str:
    """SQNR of each site's output in the quantized model against the float model, in the
    order the model runs them: where the error grows."""
    fig, ax = plt.subplots(figsize=WIDE)
    x = range(len(sites))
    ax.plot(x, [s["sqnr_db"] if s["sqnr_db"] is not None else float("nan") for s in sites],
            marker=".", color=BLUE)
    _layer_ticks(ax, [s["name"] for s in sites])
    ax.set_ylabel("SQNR of the output (dB)")
    ax.set_title("Error along the network: quantized model vs float, each site's output")
    return to_svg(fig, "fig-error-growth")


def culprits_figure(sites: list[dict], shown: int = 15) -> str:
    """The sites whose restoring to float gains most, with their own shares beside."""
    worst = sorted(sites, key=lambda s: -s["restore_gain"])[:shown][::-1]
    fig, ax = plt.subplots(figsize=(9.0, 1.0 + 0.3 * len(worst)))
    y = range(len(worst))
    ax.barh([i + 0.2 for i in y], [s["restore_gain"] for s in worst], height=0.4, color=RED,
            label="gain from restoring it to float")
    ax.barh([i - 0.2 for i in y], [sum(s["share"].values()) for s in worst], height=0.4, color=GREY,
            label="its own share (only it quantized)")
    ax.set_yticks(list(y), [s["name"] for s in worst], fontsize=7)
    ax.set_xlabel("output loss")
    ax.legend(loc="lower right", frameon=False)
    ax.set_title("Culprits, worst first")
    return to_svg(fig, "fig-culprits")


def histogram_figure(culprit: dict, index: int) -> str:
    """A culprit's per-channel weight ranges and its input values against the clipping range."""
    panels = [p for p in ("weight_ranges", "input") if culprit.get(p)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 2.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        data = culprit[panel]["histogram"]
        edges, counts = data["edges"], data["counts"]
        ax.stairs(counts, edges, fill=True, color=BLUE if panel == "weight_ranges" else ORANGE)
        ax.set_yscale("symlog")
        if panel == "weight_ranges":
            spread = culprit[panel]["spread"]
            ax.set_xlabel("weight range of an output channel")
            ax.set_title(f"weights: max/median channel range {spread:.1f}" if spread else "weights")
        else:
            inputs = culprit[panel]
            for key in ("clip_lo", "clip_hi"):
                if key in inputs:
                    ax.axvline(inputs[key], color=RED, linestyle="--")
            clipped = inputs.get("clipped")
            ax.set_xlabel("input value (red: the grid's clipping range)")
            ax.set_title("input" + (f": {100 * clipped:.3f}% clipped" if clipped is not None else ""))
    fig.suptitle(culprit["name"], fontsize=9)
    return to_svg(fig, f"fig-histogram-{index}")


def scatter_svg(series: list[dict], x_label: str, y_label: str, title: str) -> str:
    """`series`: [{"name", "points": [(x, y, label or None)], "line": bool, "color"}]."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in series:
        pts = sorted(s["points"])
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color=s["color"], linestyle="-" if s.get("line") else "none", label=s["name"])
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(frameon=False)
    return to_svg(fig, "fig-pareto") + "\n"
