"""The `sub8` command line: the same steps as the Python API."""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
import warnings

import click

# Only light modules at the top: `sub8 --help` and a bad argument answer before torch loads.
from . import progress
from .choices import OUTPUT_LOSSES, PIPELINE_NAMES, RANGE_METHODS, parse_bits
from .errors import Sub8Error, few
from .registry import cli_fields
from .table import fmt_bits, metrics_line, table_header


# The cache folder of the run in progress (set once its config is built), for the interrupt message.
_RUN = {"cache_dir": None, "started": False}


def clean_errors(fn):
    """Bad input is one line on stderr and exit status 2, never a traceback; Ctrl-C says what
    was kept and exits 130, as a shell expects of an interrupted command."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _RUN.update(cache_dir=None, started=False)  # (a process may run several commands: tests)
        try:
            return fn(*args, **kwargs)
        except Sub8Error as exc:
            click.echo(f"sub8: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if not _RUN["started"]:
                click.echo("sub8: interrupted", err=True)
            elif _RUN["cache_dir"]:
                click.echo(f"sub8: interrupted; every step this run finished is checkpointed in "
                           f"{_RUN['cache_dir']}: the same command resumes after it (--fresh starts over; "
                           f"sub8 cache list shows what is kept)", err=True)
            else:
                click.echo("sub8: interrupted; nothing was kept (the run had no cache)", err=True)
            sys.exit(130)
    return wrapper


def keep_foreign(entries: list[str], out_dir: str) -> None:
    if entries:
        click.echo(f"sub8: {out_dir} is not a sub8 run: writing sub8's files into it and keeping its "
                   f"{len(entries)} other entries ({few(entries, 5)})", err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"sub8: warning: {message}", err=True)


# Flags whose values are checked before the command is parsed: parsing builds every method's
# options from the registry, which imports torch (seconds on a busy machine).
BITS_FLAGS = ("--w-bits", "--a-bits", "--first-last-bits", "--embedding-bits")
EARLY_CHOICES = {"--pipeline": PIPELINE_NAMES, "--ranges": RANGE_METHODS}


def early_check(args: list[str]) -> None:
    """Raise Sub8Error for a bad bit-width, pipeline or range method among `args`."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in BITS_FLAGS and flag not in EARLY_CHOICES:
            continue
        if not eq:
            if i + 1 >= len(args):
                continue  # (click reports the missing value)
            value = args[i + 1]
        if flag in BITS_FLAGS:
            try:
                parse_bits(value)
            except Sub8Error as exc:
                raise Sub8Error(f"{flag} {value}: {exc}") from None
        elif value not in EARLY_CHOICES[flag]:
            raise Sub8Error(f"{flag} {value}: choose one of {', '.join(EARLY_CHOICES[flag])}")


class Sub8Group(click.Group):
    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if "--help" not in rest:
            try:
                early_check(rest)
            except Sub8Error as exc:
                click.echo(f"sub8: error: {exc}", err=True)
                sys.exit(2)
        return name, cmd, rest


@click.group(cls=Sub8Group)
@click.version_option(package_name="sub8")
def main():
    """sub8: post-training quantization of PyTorch models to 2..8 bits."""
    warnings.showwarning = _show_warning


# --help's sections, by option name; each method's own options follow under its name.
HELP_SECTIONS = {
    "Model and data": ("model_spec", "weights", "calib", "eval_dir", "eval_steps", "labels", "samples",
                       "text_column", "label_column", "max_length", "probe_train"),
    "Precision": ("w_bits", "a_bits", "first_last_bits", "layer_bits", "embedding_bits", "quantize_attention",
                  "w_symmetric", "w_asymmetric", "a_symmetric", "requantize", "strict"),
    "Recipe": ("pipeline", "steps", "ranges", "percentile", "output_loss"),
    "Output": ("out_dir", "force", "size_ratios", "inspect", "inspect_samples", "inspect_top", "inspect_confirm"),
    "Run": ("seed", "device", "forward_batch", "cache_dir", "no_cache", "fresh", "executor_kind", "ray_address"),
}
METHOD_TITLES = {"adaquant": "AdaQuant", "gptq": "GPTQ"}


class QuantCommand(click.Command):
    """A command whose options include every registered method's settings, read from the
    registry when the command runs (a method registered at run time gets its options too).
    Its --help groups the options by stage and lists the steps and pipelines."""

    def get_params(self, ctx):
        return [*super().get_params(ctx), *(option for option, _ in method_options().values())]

    def format_options(self, ctx, formatter):
        owner = {option.name: targets[0][0] for option, targets in method_options().values()}
        section_of = {name: title for title, names in HELP_SECTIONS.items() for name in names}
        groups = collections.defaultdict(list)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                key = owner.get(param.name)
                title = (f"{METHOD_TITLES.get(key, key.replace('_', ' ').capitalize())} (method settings)" if key
                         else "Run" if param is self.get_help_option(ctx) else section_of.get(param.name, "Other"))
                groups[title].append(record)
        order = [t for t in HELP_SECTIONS if t != "Run"] + sorted(t for t in groups if t not in HELP_SECTIONS)
        for title in order + ["Run"]:
            if groups.get(title):
                with formatter.section(title):
                    formatter.write_dl(groups[title])

    def format_epilog(self, ctx, formatter):
        from .pipeline import PIPELINES
        from .registry import METHODS
        with formatter.section("Steps (--steps, comma-separated; ranges first)"):
            formatter.write_dl([(name, _first_line(m.run.__doc__)) for name, m in METHODS.items()])
        with formatter.section("Pipelines (--pipeline)"):
            formatter.write_dl([(name, ", ".join(steps) if steps else "by precision (see --pipeline)")
                                for name, steps in PIPELINES.items()])


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def method_options() -> dict[str, tuple[click.Option, list]]:
    """{flag: (its click option, [(settings key, field, parse)])}: one option per flag; a flag
    that several methods declare (--holdout) sets each of them."""
    out: dict[str, tuple[click.Option, list]] = {}
    from .config import settings_classes  # (registers the built-in methods: imports torch)
    for key, cls in settings_classes().items():
        for f, meta in cli_fields(cls):
            flag = meta.get("flag") or f"--{key}-{f.name}".replace("_", "-")
            if flag in out:
                out[flag][1].append((key, f.name, meta.get("parse")))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            dest = "setting__" + flag.lstrip("-").replace("-", "_")
            help_text = meta.get("help") or f"{key}.{f.name}"
            if meta.get("is_flag"):
                option = click.Option([flag, dest], is_flag=True, default=default, help=help_text)
            elif meta.get("multiple"):
                option = click.Option([flag, dest], multiple=True, type=meta.get("type"), help=help_text)
            else:
                shown = meta["show"](default) if meta.get("show") else default
                kind = click.Choice(meta["choices"]) if meta.get("choices") else meta.get("type")
                option = click.Option([flag, dest], default=shown, type=kind, show_default=default is not None,
                                      help=help_text)
            out[flag] = (option, [(key, f.name, meta.get("parse"))])
    return out


def method_settings(opts: dict) -> dict[str, dict]:
    """{settings key: {field: value}} from the parsed method options (removed from `opts`)."""
    settings: dict[str, dict] = {}
    for option, targets in method_options().values():
        value = opts.pop(option.name)
        if option.multiple:
            value = tuple(value)
        for key, name, parse in targets:
            settings.setdefault(key, {})[name] = parse(value) if parse and isinstance(value, str) else value
    return settings


def quant_options(fn):
    """The options shared by `quantize` and `pareto` that every run has; the methods' own
    options come from the registry (QuantCommand)."""
    options = [
        click.option("--model", "model_spec", required=True, help="zoo:NAME, torchvision:NAME, hf:DIR or python:pkg.mod:fn"),
        click.option("--weights", default=None, help="state dict file for torchvision:/python: models"),
        click.option("--calib", required=True, help="calibration samples: a folder of images, or a .csv/.jsonl "
                     "file of texts for a text model"),
        click.option("--w-bits", default="8", show_default=True, help="weight bits 2..8 or float"),
        click.option("--a-bits", default="8", show_default=True, help="activation bits 2..8 or float"),
        click.option("--first-last-bits", default="8", show_default=True, help="bits of the first and last layer"),
        click.option("--embedding-bits", default="8", show_default=True,
                     help="bits of embedding tables (per-row grids) or float"),
        click.option("--attention/--no-attention", "quantize_attention", default=True, show_default=True,
                     help="quantize attention's matrix-product operands (queries, keys, softmax "
                          "probabilities, values) at --a-bits in transformers models"),
        click.option("--layer-bits", multiple=True, help="PATTERN=W[,A] per-layer bits by name pattern (repeatable)"),
        click.option("--pipeline", type=click.Choice(list(PIPELINE_NAMES)), default="auto", show_default=True,
                     help="auto: ranges then bias correction when every layer has 8 bits, with channel "
                          "equalization of depthwise and 1x1 convolution inputs (equalize) before it in "
                          "models that have them; ranges then sequential AdaQuant when any has fewer; "
                          "SmoothQuant after the ranges in models with attention; rtn: ranges only (round to nearest); "
                          "adaquant: ranges then AdaQuant; light, advanced: the paper's bit-allocation recipes"),
        click.option("--steps", default=None, help="explicit step list, e.g. ranges,bias_correction or ranges,gptq"),
        click.option("--ranges", type=click.Choice(RANGE_METHODS), default="auto", show_default=True,
                     help="range of every grid: auto (image models: at 8 bits min-max weights and percentile "
                          "activations, mse below; text "
                          "models: mse, which keeps their outlier features), minmax, percentile (--percentile), "
                          "mse (the clipping that minimizes the rounding error)"),
        click.option("--percentile", default=99.99, show_default=True, help="for --ranges percentile"),
        click.option("--w-symmetric", is_flag=True, help="weight grids with zero point 0 at every width "
                     "[default: at 8 bits only, where they lose less and ONNX Runtime's integer kernels need them]"),
        click.option("--w-asymmetric", is_flag=True, help="weight grids with a zero point per channel at every "
                     "width [default: below 8 bits only]"),
        click.option("--a-symmetric", is_flag=True, help="symmetric activation grids (default asymmetric)"),
        click.option("--requantize/--no-requantize", default=None,
                     help="quantize the tensors between layers that would stay float (both inputs of each "
                          "residual add, the final pool's input), so that ONNX Runtime runs the whole exported "
                          "network on integers [default: when every layer is W8A8, unless the pipeline allocates bits]"),
        click.option("--strict", is_flag=True, help="stop with an error when any weight-bearing operation would "
                     "stay in float without being asked to (report.json's coverage lists them either way)"),
        click.option("--samples", default=256, show_default=True, help="calibration samples to use"),
        click.option("--forward-batch", default=32, show_default=True, help="samples per forward pass"),
        click.option("--seed", default=0, show_default=True, help="seed of every random choice (sample order, "
                     "mini-batches): the same seed, data and settings give the same model"),
        click.option("--device", default="cpu", show_default=True, help="cpu, or cuda / cuda:N to run the steps on a GPU"),
        click.option("--output-loss", type=click.Choice(OUTPUT_LOSSES), default=None,
                     help="float vs quantized outputs, no labels (sensitivities, bias tuning): kl for "
                          "classifiers (the default), mse for feature extractors (the default for "
                          "sentence encoders)"),
        click.option("--cache-dir", default=None, help="where allocation candidates, sensitivities and "
                     "checkpoints are cached [default: $SUB8_CACHE_DIR or ~/.cache/sub8]"),
        click.option("--no-cache", is_flag=True, help="neither read nor write the cache"),
        click.option("--fresh", is_flag=True, help="start over: read nothing from the cache (an "
                     "interrupted run of the same command otherwise resumes after its last finished step)"),
        click.option("--executor", "executor_kind", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="where the independent work runs (candidate precisions, sensitivity "
                     "cells, parallel AdaQuant groups, Pareto points): this process, or Ray tasks (pip install "
                     "'sub8[ray]'); the results are the same"),
        click.option("--ray-address", default=None, help="with --executor ray: auto (the cluster `ray start` runs "
                     "here) or HOST:PORT of a cluster's head [default: a Ray instance started for the run]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(o: dict):
    import torch

    from .config import QuantConfig, parse_layer_bits
    if o["device"].startswith("cuda") and not torch.cuda.is_available():
        raise Sub8Error(f"--device {o['device']}: no CUDA device is available")
    if o["w_symmetric"] and o["w_asymmetric"]:
        raise Sub8Error("--w-symmetric and --w-asymmetric exclude each other")
    w_symmetric = True if o["w_symmetric"] else False if o["w_asymmetric"] else None  # None: by bits
    methods = method_settings(o)
    extra = {} if o["cache_dir"] is None else {"cache_dir": o["cache_dir"]}
    if o["no_cache"]:
        extra["cache_dir"] = None
    config = QuantConfig(w_bits=o["w_bits"], a_bits=o["a_bits"], first_last_bits=o["first_last_bits"],
                       embedding_bits=o["embedding_bits"], quantize_attention=o["quantize_attention"],
                       layer_bits=parse_layer_bits(o["layer_bits"]), ranges=o["ranges"], percentile=o["percentile"],
                       w_symmetric=w_symmetric, a_symmetric=o["a_symmetric"], requantize=o["requantize"],
                       strict=o["strict"], pipeline=o["pipeline"],
                       steps=o["steps"], samples=o["samples"], forward_batch=o["forward_batch"], seed=o["seed"],
                       output_loss=o["output_loss"], device=o["device"], methods=methods, **extra)
    _RUN.update(cache_dir=config.cache_dir, started=True)
    return config


def build_executor(o: dict):
    """The run's executor; a Ray cluster that cannot be reached is an error before any work."""
    if o["executor_kind"] == "local":
        if o["ray_address"] is not None:
            raise Sub8Error("--ray-address needs --executor ray")
        return None
    from .ray_executor import RayExecutor
    progress.say(f"connecting to Ray ({o['ray_address'] or 'a local instance for this run'})")
    return RayExecutor(o["ray_address"], o["device"])


def data_options(text_column: str, label_column: str | None, max_length: int) -> dict:
    return {"text_column": text_column, "label_column": label_column, "max_length": max_length}


def inspect_options(fn):
    options = [
        click.option("--inspect", is_flag=True, help="last, find the sites that hurt (as `sub8 inspect`), on the "
                     "evaluation samples if given, else the calibration samples"),
        click.option("--inspect-samples", default=32, show_default=True, help="samples to rank the sites on: "
                     "each site's measurements rerun the network after it on them"),
        click.option("--inspect-top", default=3, show_default=True, help="culprits to measure fixes for"),
        click.option("--inspect-confirm", default=64, show_default=True, help="other samples the culprits' gains "
                     "and fixes are measured again on (a gain that only won the ranking by chance shows there)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def inspect_settings(on: bool, samples: int, top: int, confirm: int):
    from .analyzer import InspectSettings
    if samples < 1 or top < 0 or confirm < 0:
        raise Sub8Error("--inspect-samples must be at least 1, --inspect-top and --inspect-confirm at least 0")
    return InspectSettings(samples=samples, top=top, confirm=confirm) if on else None


def inspect_summary(record: dict) -> list[str]:
    from .analyzer import summary
    return summary(record)


@main.command(cls=QuantCommand)
@quant_options
@click.option("--eval", "eval_dir", default=None, help="evaluation images (a folder), or texts (a .csv/.jsonl file)")
@click.option("--labels", type=click.Choice(["none", "folders"]), default="none",
              help="'folders': the eval folder's class sub-folders give labels")
@click.option("--text-column", default="text", show_default=True, help="text models: the column that holds the text")
@click.option("--label-column", default=None, help="text models: the evaluation file's label column")
@click.option("--max-length", default=128, show_default=True, help="text models: tokens per text (longer ones are cut)")
@click.option("--probe-train", default=None,
              help="sentence encoders: a labelled text file (--label-column) to fit a logistic-regression "
                   "head on float embeddings; --eval's accuracy is then measured through that frozen head")
@click.option("--eval-steps", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="with --eval, measure after every step (report.json shows what each adds) or after the last "
                   "only (one evaluation pass instead of one per step)")
@click.option("--out", "out_dir", required=True, help="output folder")
@click.option("--force", is_flag=True, help="write into a folder that is not a sub8 run: sub8 replaces only its "
              "own files (report.json, report.html, model.safetensors, pareto.*) and keeps the others")
@inspect_options
@clean_errors
def quantize(eval_dir, labels, text_column, label_column, max_length, probe_train, eval_steps, out_dir, force,
             inspect, inspect_samples, inspect_top, inspect_confirm, **opts):
    """Quantize a model and write OUT/report.json, OUT/report.html and OUT/model.safetensors."""
    from .adapters import adapter_for
    from .export import save
    from .export.artifact import artifact_size
    from .page import report_page
    from .pipeline import quantize as run_quantize
    from .report import PAGE, REPORT, atomic_dir, check_output_dir, is_run_file, write_bytes_atomic, write_json
    from .zoo import load_model

    keep_foreign(check_output_dir(out_dir, force), out_dir)
    config = build_config(opts)
    executor = build_executor(opts)
    progress.say(f"loading the model {opts['model_spec']}")
    loaded = load_model(opts["model_spec"], opts["weights"])
    adapter = adapter_for(loaded.module)
    reading = data_options(text_column, None, max_length)
    progress.say(f"reading up to {config.samples} calibration samples from {opts['calib']}")
    calib_set = adapter.load_samples(opts["calib"], loaded, "calibration", limit=config.samples, seed=config.seed,
                                     **reading)
    probe = probe_record = None
    if probe_train is not None:
        probe, probe_record = adapter.fit_probe(loaded, probe_train, eval_dir, config,
                                                **data_options(text_column, label_column, max_length))
    eval_set = None
    if eval_dir is not None:
        progress.say(f"reading the evaluation samples from {eval_dir}")
        eval_set = adapter.load_samples(eval_dir, loaded, "evaluation", seed=config.seed, labels=labels,
                                        classes=None if probe is None else probe.classes,
                                        **data_options(text_column, label_column, max_length))
    calib = calib_set.tensor
    qmodel = run_quantize(loaded.module, calib, config, eval_images=None if eval_set is None else eval_set.tensor,
                          eval_labels=None if eval_set is None else eval_set.labels, fresh=opts["fresh"],
                          probe=probe, inspect=inspect_settings(inspect, inspect_samples, inspect_top, inspect_confirm),
                          executor=executor, step_metrics=eval_steps == "all")
    report = qmodel.report
    if probe_record is not None:
        report["probe"] = probe_record
    report["model"] = {"spec": opts["model_spec"], "weights": opts["weights"]}
    report["calibration"].update({"folder": os.path.abspath(opts["calib"]), "skipped": len(calib_set.skipped)})
    if eval_set is not None:
        report["evaluation"] = {"folder": os.path.abspath(eval_dir), "n_images": len(eval_set.tensor),
                                "skipped": len(eval_set.skipped), "labels": eval_set.label_source}
    with atomic_dir(out_dir, keep=lambda name: not is_run_file(name)) as tmp:
        path = save(qmodel, tmp, opts["model_spec"], (1,) + tuple(calib.shape[1:]), adapter.describe_input(loaded))
        report["artifact"] = artifact_size(path, report["size"])
        write_json(os.path.join(tmp, REPORT), report)
        write_bytes_atomic(os.path.join(tmp, PAGE), report_page(report).encode())
    print_summary(report, out_dir)


@main.command(cls=QuantCommand)
@quant_options
@click.option("--eval", "eval_dir", required=True, help="evaluation samples (a folder of images, or a text file)")
@click.option("--text-column", default="text", show_default=True, help="text models: the column that holds the text")
@click.option("--max-length", default=128, show_default=True, help="text models: tokens per text (longer ones are cut)")
@click.option("--size-ratios", required=True, help="weight-memory budgets, e.g. 0.10,0.125,0.15,0.2,0.25")
@click.option("--out", "out_dir", required=True, help="output folder: pareto.json, pareto.md, pareto.svg")
@click.option("--force", is_flag=True, help="write into a folder that is not a sub8 run: sub8 replaces only its "
              "own files (report.json, model.safetensors, pareto.*) and keeps the others")
@clean_errors
def pareto(eval_dir, text_column, max_length, size_ratios, out_dir, force, **opts):
    """Allocate, build and evaluate one model per size budget, beside the uniform precisions."""
    from .adapters import adapter_for
    from .pareto import header, pareto as run_pareto
    from .page import pareto_page
    from .plot import scatter_svg
    from .report import (PAGE, REPORT, TOOL, atomic_dir, check_output_dir, is_run_file, versions,
                         write_bytes_atomic, write_json)
    from .zoo import load_model

    keep_foreign(check_output_dir(out_dir, force), out_dir)
    try:
        ratios = [float(r) for r in size_ratios.split(",") if r.strip()]
    except ValueError:
        raise Sub8Error(f"--size-ratios expects numbers like 0.1,0.15, got {size_ratios!r}") from None
    if opts["pipeline"] == "auto" and not opts["steps"]:
        opts["pipeline"] = "light"
    if not ratios:
        raise Sub8Error("--size-ratios needs at least one budget")
    opts["setting__size_ratio"] = opts["setting__size_ratio"] or ratios[0]  # each point sets its own
    config = build_config(opts)
    executor = build_executor(opts)
    loaded = load_model(opts["model_spec"], opts["weights"])
    adapter = adapter_for(loaded.module)
    reading = data_options(text_column, None, max_length)
    calib = adapter.load_samples(opts["calib"], loaded, "calibration", limit=config.samples, seed=config.seed,
                                 **reading).tensor
    evals = adapter.load_samples(eval_dir, loaded, "evaluation", seed=config.seed, **reading).tensor
    click.echo(header())
    result = run_pareto(loaded.module, calib, evals, config, ratios, echo=click.echo, executor=executor)
    metric = result["metric"]
    result.update({"tool": TOOL, "model": opts["model_spec"], "config": config.to_dict(), "versions": versions()})
    good = [r for r in result["points"] if "error" not in r]
    svg = scatter_svg([{"name": "allocated", "color": "#1f77b4", "line": True,
                        "points": [(r["size_ratio"], r["metrics"][metric] or 0.0, None) for r in good]},
                       {"name": "uniform", "color": "#d62728",
                        "points": [(r["size_ratio"], r["metrics"][metric] or 0.0, r["precision"])
                                   for r in result["uniform"]]}],
                      "weight memory / float32", metric.replace("_", " "), f"{opts['model_spec']}: Pareto front")
    lines = [f"| model | size ratio | BOPs ratio | {metric} | top-1 | KL |", "|---|---|---|---|---|---|"]
    for label, r in [(f"size <= {r['budget']:g}", r) for r in result["points"]] + \
                    [(f"uniform {r['precision']}", r) for r in result["uniform"]]:
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | |")
        else:
            m = r["metrics"]
            cells = [f"{m[k]:.3f}" if m.get(k) is not None else "n/a" for k in (metric, "top1_agreement", "kl")]
            lines.append(f"| {label} | {r['size_ratio']:.4f} | {r['bops_ratio']:.4f} | {' | '.join(cells)} |")
    with atomic_dir(out_dir, keep=lambda name: not is_run_file(name)) as tmp:
        write_json(os.path.join(tmp, "pareto.json"), result)
        write_bytes_atomic(os.path.join(tmp, "pareto.md"), ("\n".join(lines) + "\n").encode())
        write_bytes_atomic(os.path.join(tmp, "pareto.svg"), svg.encode())
        write_bytes_atomic(os.path.join(tmp, PAGE), pareto_page(result, svg, lines).encode())
        write_json(os.path.join(tmp, REPORT), {"tool": TOOL, "command": "pareto", "model": opts["model_spec"]})
    click.echo(f"  wrote {os.path.join(out_dir, 'pareto.json')}, pareto.md, pareto.svg and {PAGE}")


@main.command("inspect")
@click.argument("run_dir")
@click.option("--data", required=True, help="samples to inspect on: a folder of images, or a .csv/.jsonl file of "
              "texts (the calibration or evaluation data again)")
@click.option("--samples", default=32, show_default=True, help="samples to rank the sites on (chosen at random by "
              "the run's seed): each site's measurements rerun the network after it on them")
@click.option("--top", default=3, show_default=True, help="culprits to measure fixes for")
@click.option("--confirm", default=64, show_default=True, help="other samples the culprits' gains and fixes are "
              "measured again on (a gain that only won the ranking by chance shows there)")
@click.option("--text-column", default="text", show_default=True, help="text models: the column that holds the text")
@click.option("--max-length", default=128, show_default=True, help="text models: tokens per text (longer ones are cut)")
@clean_errors
def inspect(run_dir, data, samples, top, confirm, text_column, max_length):
    """Find the layers of RUN_DIR's quantized model (a `sub8 quantize` output folder) that lose
    the most, with a ready --layer-bits line for each; adds `inspect` to its report.json and
    report.html. The float model comes from the run's model spec."""
    import json

    from .adapters import adapter_for
    from .analyzer import inspect as inspect_model, split_samples
    from .config import QuantConfig
    from .export.artifact import load
    from .page import report_page
    from .report import PAGE, REPORT, write_bytes_atomic, write_json
    from .size import size_report
    from .zoo import load_model

    settings = inspect_settings(True, samples, top, confirm)
    try:
        with open(os.path.join(run_dir, REPORT)) as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        raise Sub8Error(f"{run_dir!r} is not a finished `sub8 quantize` folder: no readable {REPORT} ({exc})") from None
    if report.get("tool") != "sub8" or "model" not in report or report.get("command") == "pareto":
        raise Sub8Error(f"{run_dir!r} is not a `sub8 quantize` folder (its {REPORT} has no model spec)")
    config = QuantConfig.from_dict(report["config"])
    progress.say(f"loading the quantized model from {run_dir} and the float model {report['model']['spec']}")
    quantized = load(run_dir, config.device)
    loaded = load_model(report["model"]["spec"], report["model"].get("weights"))
    adapter = adapter_for(loaded.module)
    wanted = settings.samples + settings.confirm
    progress.say(f"reading up to {wanted} samples from {data}")
    samples_set = adapter.load_samples(data, loaded, "inspection", limit=wanted, seed=config.seed,
                                       **data_options(text_column, None, max_length))
    tensor, fresh = split_samples(samples_set.tensor, settings.samples, settings.confirm, config.seed)
    reference = adapter.prepare(loaded.module, tensor[:1], config).module
    record = inspect_model(quantized.prepared, reference, tensor, config,
                           lambda f, q: adapter.compare(loaded.module, f, q),
                           lambda: size_report(quantized.prepared)["ratio"], top=settings.top, fresh=fresh)
    report["inspect"] = record
    write_json(os.path.join(run_dir, REPORT), report)
    write_bytes_atomic(os.path.join(run_dir, PAGE), report_page(report).encode())
    for line in inspect_summary(record):
        click.echo(line)
    click.echo(f"wrote the results into {os.path.join(run_dir, REPORT)} and {PAGE}")


@main.command("export")
@click.argument("run_dir")
@click.option("--onnx", "onnx_path", required=True, help="write the ONNX QDQ graph here (opset 21)")
@click.option("--weights", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True,
              help="8-bit weights' type: int8 runs on ONNX Runtime's fast uint8 x int8 kernels, which can "
                   "saturate on x86 CPUs without VNNI (AVX2 only); uint8 is exact on every CPU, about half as fast")
@clean_errors
def export(run_dir, onnx_path, weights):
    """Export the quantized model of RUN_DIR (a `sub8 quantize` output folder)."""
    from .export.onnx_qdq import export_onnx

    record = export_onnx(run_dir, onnx_path, weights)
    kinds = collections.Counter(f"W:{v['weight'] or 'float'} A:{v['input'] or 'float'}"
                                for v in record["layers"].values())
    click.echo(f"wrote {record['path']} ({record['bytes'] / 2 ** 20:.2f} MiB, opset {record['opset']}, "
               f"{len(record['layers'])} quantized layers, {record['integer_kernel_layers']} of them "
               f"W8A8 convolutions with symmetric weights, which ONNX Runtime fuses into integer kernels)")
    for kind, n in kinds.most_common():
        click.echo(f"  {n:4d} x {kind}")


def coverage_lines(report: dict, shown: int = 5) -> None:
    """What stayed float, from report.json's coverage (prepare/coverage.py), and how it was captured."""
    capture, coverage = report.get("capture") or {}, report.get("coverage") or {}
    if capture.get("path") == "modules" and capture.get("reason"):
        click.echo(f"  no graph: {capture['reason']}; prepared module by module, without: {', '.join(capture['lost'])}")
    if not coverage:
        return
    products = coverage["products"]
    attention = f"; attention products quantized: {products['quantized']} of " \
                f"{products['quantized'] + products['float']}" if products["quantized"] + products["float"] else ""
    click.echo(f"  coverage: {100 * coverage['macs']['share']:.2f}% of weight and attention MACs and "
               f"{100 * coverage['params']['share']:.1f}% of parameters quantized{attention}")
    left = coverage["float"]
    for e in left[:shown]:
        click.echo(f"    float: {e['where']} {e['op']}{' ' + e['weights'][0] if e['weights'] else ''} "
                   f"({100 * e['macs_share']:.2f}% of MACs, {100 * e['params_share']:.2f}% of parameters): {e['reason']}")
    if len(left) > shown:
        click.echo(f"    ... and {len(left) - shown} more left in float (report.json: coverage.float; --strict refuses them)")


def print_summary(report: dict, out_dir: str) -> None:
    c = report["config"]
    layers = report["layers"]
    recipe = ",".join(c["steps"]) if c["steps"] else c["pipeline"]
    click.echo(f"sub8: {report['model']['spec']}  steps={recipe}  W{fmt_bits(c['w_bits'])}"
               f"A{fmt_bits(c['a_bits'])}  first/last="
               f"{'allocated' if 'allocate' in report and c['methods']['allocation']['first_last'] else fmt_bits(c['first_last_bits'])}"
               f"  ranges={c['ranges']}")
    click.echo(f"  {len(layers)} layers quantized on {report['calibration']['n_images']} calibration samples;"
               f" weight size {report['size']['weight_bits'] / 8e6:.2f} MB"
               f" ({100 * report['size']['ratio']:.1f}% of float32)")
    coverage_lines(report)
    tables, attention = report.get("embeddings", {}), report.get("attention", {})
    if tables or attention.get("modules"):
        click.echo(f"  also quantized: {len(tables)} embedding tables at {fmt_bits(c['embedding_bits'])} bits; "
                   f"attention operands (query, key, probs, value) in {attention.get('modules', 0)} modules "
                   f"at {fmt_bits(attention.get('bits'))} bits")
    if "allocate" in report:
        a = report["allocate"]
        chosen = collections.Counter(a["choice"].values())
        click.echo(f"  bits allocated ({a['solver']}, {a['loss']}): "
                   + ", ".join(f"{n} x {p}" for p, n in sorted(chosen.items()))
                   + f"; predicted degradation {a['predicted_degradation']:.4g},"
                     f" measured {a['measured_degradation']:.4g}")
        for cost in a["costs"].values():
            if cost["budget"] is not None:
                value = cost["result"] if cost["ratio"] is None or cost["budget_unit"] == "latency_ms" else cost["ratio"]
                click.echo(f"  {cost['budget_unit']} {value:.6g} within budget {cost['budget']:.6g}")
    for step in report["steps"]:
        click.echo(f"  step {step['name']:<10} {step['seconds']:7.1f} s  peak RSS {step['peak_rss_mb']:7.0f} MB")
    if "metrics" in report and "cosine_similarity" in report["metrics"]["quantized"]:
        m = report["metrics"]["quantized"]
        click.echo(f"  evaluated on {m['n_samples']} texts: float vs quantized embeddings, mean cosine "
                   f"{m['cosine_similarity']:.4f}, relative MSE {m['relative_mse']:.4g}")
        if "accuracy" in m:
            click.echo(f"  probe accuracy (frozen head fit on {report['probe']['n_samples']} float embeddings): "
                       f"float {100 * report['metrics']['float']['accuracy']:.2f}%, "
                       f"quantized {100 * m['accuracy']:.2f}%")
    elif "metrics" in report:
        m = report["metrics"]
        labelled = "accuracy" in m["float"]
        click.echo(f"  evaluated on {m['float']['n_images']} images "
                   f"({m['float']['n_confident']} confident: float top probability >= 0.5)")
        click.echo("  " + table_header(labelled))
        click.echo("  " + metrics_line("float", m["float"], 1.0))
        click.echo("  " + metrics_line("quantized", m["quantized"], report["size"]["ratio"]))
    if "inspect" in report:
        for line in inspect_summary(report["inspect"]):
            click.echo("  " + line)
    click.echo(f"  wrote {os.path.join(out_dir, 'report.json')}, report.html and "
               f"{os.path.join(out_dir, 'model.safetensors')}")


@main.group()
def cache():
    """See or clear what runs keep in the cache folder (allocation candidates, sensitivities,
    checkpoints of interrupted runs)."""


_cache_dir_option = click.option("--cache-dir", default=None, help="the cache folder [default: $SUB8_CACHE_DIR or "
                                 "~/.cache/sub8]")


@cache.command("list")
@_cache_dir_option
@clean_errors
def cache_list(cache_dir):
    """What the cache holds, by kind: entries, size, newest."""
    import time

    from .cache import cache_entries, default_cache_dir
    folder = cache_dir or default_cache_dir()
    entries = cache_entries(folder)
    click.echo(f"{folder}: {len(entries)} entries, {sum(e['bytes'] for e in entries) / 2 ** 20:.1f} MiB")
    kinds = collections.defaultdict(list)
    for e in entries:
        kinds[e["kind"]].append(e)
    for kind, items in sorted(kinds.items()):
        age = (time.time() - max(e["mtime"] for e in items)) / 3600
        click.echo(f"  {kind:12s} {len(items):5d} entries {sum(e['bytes'] for e in items) / 2 ** 20:9.1f} MiB"
                   f"   newest {age:.1f} h ago")


@cache.command("clear")
@_cache_dir_option
@click.option("--kind", default=None, help="only this kind (e.g. checkpoint); default: every kind")
@clean_errors
def cache_clear(cache_dir, kind):
    """Remove sub8's cache entries (files of other names in the folder are left alone)."""
    from .cache import clear_cache, default_cache_dir
    folder = cache_dir or default_cache_dir()
    removed = clear_cache(folder, kind)
    click.echo(f"removed {len(removed)} entries ({sum(e['bytes'] for e in removed) / 2 ** 20:.1f} MiB) "
               f"from {folder}")


@main.command()
@click.option("--model", "model_spec", default="zoo:mobilenet_v2", show_default=True)
@click.option("--ranges", type=click.Choice(RANGE_METHODS), default="auto", show_default=True)
@click.option("--photos", default=None, help="where to write the demo crops (default: a cache folder)")
@click.option("--out", "out_path", default=None, help="also write the table as JSON here")
@click.option("--seed", default=0, show_default=True)
@clean_errors
def demo(model_spec, ranges, photos, out_path, seed):
    """Quantize the default model on the embedded photos, W8A8 to W4A4: round to nearest, the
    default recipe, sequential AdaQuant (CPU setting) and one mixed-precision point."""
    from .demo import run_demo
    run_demo(model_spec, ranges, photos, out_path, seed, echo=click.echo)


if __name__ == "__main__":
    main()
