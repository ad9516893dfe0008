"""The `sub8` command line: the same steps as the Python API."""

from __future__ import annotations

import collections
import functools
import os
import sys
import warnings

import click
import torch

from .config import (ADAQUANT_LOSSES, ADAQUANT_MODES, INPUT_RANGES, LR_SCHEDULES, OUTPUT_LOSSES, SOLVERS,
                     AdaQuantConfig, AllocationConfig, BiasTuningConfig, QuantConfig, parse_layer_bits)
from .errors import Sub8Error
from .quant.ranges import METHODS
from .table import fmt_bits, metrics_line, table_header


def clean_errors(fn):
    """Bad input is one line on stderr and exit status 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Sub8Error as exc:
            click.echo(f"sub8: error: {exc}", err=True)
            sys.exit(2)
    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"sub8: warning: {message}", err=True)


@click.group()
@click.version_option(package_name="sub8")
def main():
    """sub8: post-training quantization of PyTorch models to 2..8 bits."""
    warnings.showwarning = _show_warning


def quant_options(fn):
    """The options shared by `quantize` and `pareto`: one QuantConfig from the command line."""
    options = [
        click.option("--model", "model_spec", required=True, help="zoo:NAME, torchvision:NAME or python:pkg.mod:fn"),
        click.option("--weights", default=None, help="state dict file for torchvision:/python: models"),
        click.option("--calib", required=True, help="folder of calibration images (searched recursively)"),
        click.option("--w-bits", default="4", show_default=True, help="weight bits 2..8 or float"),
        click.option("--a-bits", default="4", show_default=True, help="activation bits 2..8 or float"),
        click.option("--first-last-bits", default="8", show_default=True, help="bits of the first and last layer"),
        click.option("--embedding-bits", default="8", show_default=True,
                     help="bits of embedding tables (per-row grids) or float"),
        click.option("--attention/--no-attention", "quantize_attention", default=True, show_default=True,
                     help="quantize attention's matrix-product operands (queries, keys, softmax "
                          "probabilities, values) at --a-bits in transformers models"),
        click.option("--layer-bits", multiple=True, help="PATTERN=W[,A] per-layer bits by name pattern (repeatable)"),
        click.option("--pipeline", default="rtn", show_default=True,
                     help="rtn, adaquant (ranges then AdaQuant), light or advanced (bit allocation)"),
        click.option("--steps", default=None, help="explicit step list, e.g. ranges,bias_correction"),
        click.option("--ranges", type=click.Choice(METHODS), default="mse", show_default=True),
        click.option("--percentile", default=99.99, show_default=True, help="for --ranges percentile"),
        click.option("--w-symmetric", is_flag=True, help="symmetric weight grids (default asymmetric)"),
        click.option("--a-symmetric", is_flag=True, help="symmetric activation grids (default asymmetric)"),
        click.option("--samples", default=256, show_default=True, help="calibration images to use"),
        click.option("--forward-batch", default=32, show_default=True, help="images per forward pass"),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--adaquant", "adaquant_mode", type=click.Choice(ADAQUANT_MODES), default="parallel",
                     show_default=True, help="AdaQuant inputs: float (parallel) or quantized model's (sequential)"),
        click.option("--iters", default=AdaQuantConfig.iters, show_default=True,
                     help="AdaQuant iterations per layer (faster on a CPU: 100, with --lr-weight 1e-2, "
                          "--lr-input-quant 1e-1 and --batch-size 16; see README)"),
        click.option("--batch-size", default=AdaQuantConfig.batch_size, show_default=True, help="AdaQuant mini-batch"),
        click.option("--lr-weight", default=AdaQuantConfig.lr_weight, show_default=True,
                     help="relative rate of the weights (in units of their channel's grid step)"),
        click.option("--lr-bias", default=AdaQuantConfig.lr_bias, show_default=True),
        click.option("--lr-weight-quant", default=AdaQuantConfig.lr_weight_quant, show_default=True,
                     help="relative rate of the weight steps (log space)"),
        click.option("--lr-input-quant", default=AdaQuantConfig.lr_input_quant, show_default=True,
                     help="relative rate of the input steps (log space)"),
        click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=AdaQuantConfig.lr_schedule,
                     show_default=True, help="AdaQuant learning rates: cosine decay to 0, or constant"),
        click.option("--adaquant-loss", type=click.Choice(ADAQUANT_LOSSES), default=AdaQuantConfig.loss,
                     show_default=True, help="AdaQuant's reconstruction loss: plain MSE, or each element "
                     "weighted by the output loss's Fisher diagonal (see README)"),
        click.option("--fisher-draws", default=AdaQuantConfig.fisher_draws, show_default=True,
                     help="backward passes per calibration sample that estimate the Fisher weights"),
        click.option("--holdout", default=AdaQuantConfig.holdout, show_default=True,
                     help="share of calibration samples kept out of AdaQuant and bias tuning to measure them"),
        click.option("--max-memory", default=AdaQuantConfig.max_memory_gb, show_default=True,
                     help="GB bound on AdaQuant's cached activations"),
        click.option("--cache-fp16", is_flag=True, help="cache AdaQuant activations in float16"),
        click.option("--bias-iters", default=BiasTuningConfig.iters, show_default=True, help="bias tuning iterations"),
        click.option("--bias-batch-size", default=BiasTuningConfig.batch_size, show_default=True),
        click.option("--bias-lr", default=BiasTuningConfig.lr, show_default=True, help="bias tuning Adam rate"),
        click.option("--bias-tune-ranges", type=click.Choice(INPUT_RANGES), default=BiasTuningConfig.input_ranges,
                     show_default=True, help="bias tuning also trains the last layer's input step, or every layer's"),
        click.option("--bias-range-lr", default=BiasTuningConfig.range_lr, show_default=True,
                     help="bias tuning's rate for input steps, relative to each step"),
        click.option("--size-ratio", type=float, default=None,
                     help="bit allocation budget: weight memory / the float32 model's"),
        click.option("--bops-ratio", type=float, default=None,
                     help="bit allocation budget: BOPs / the float model's at 32x32 bits (W8A8 = 0.0625)"),
        click.option("--latency-ms", type=float, default=None, help="bit allocation budget: summed layer latency"),
        click.option("--latency-table", default=None, help="JSON: layer -> precision (W4A8, float) -> ms"),
        click.option("--max-degradation", type=float, default=None,
                     help="least weight memory whose predicted loss increase is at most this"),
        click.option("--precisions", default=",".join(f"W{w}A{a}" for w, a in AllocationConfig.precisions),
                     show_default=True, help="candidate precisions for bit allocation"),
        click.option("--base-bits", default="W8A8", show_default=True,
                     help="precision of the other layers while one layer's sensitivity is measured"),
        click.option("--output-loss", type=click.Choice(OUTPUT_LOSSES), default=None,
                     help="float vs quantized outputs, no labels (sensitivities, bias tuning): kl for "
                          "classifiers (the default), mse for feature extractors (the default for "
                          "sentence encoders)"),
        click.option("--tie", multiple=True, help="PAT1,PAT2,...: matching layers get one precision (repeatable)"),
        click.option("--sensitivity-samples", type=int, default=None,
                     help="measure sensitivities on the first N calibration samples [default: all]"),
        click.option("--allocate-first-last", is_flag=True,
                     help="bit allocation also chooses the first and last layers' precision "
                          "(else they hold --first-last-bits)"),
        click.option("--solver", type=click.Choice(SOLVERS), default="milp", show_default=True,
                     help="milp (exact) or greedy (baseline)"),
        click.option("--cache-dir", default=None, help="where allocation candidates and sensitivities are "
                     "cached [default: $SUB8_CACHE_DIR or ~/.cache/sub8]"),
        click.option("--no-cache", is_flag=True, help="neither read nor write the cache"),
        click.option("--fresh", is_flag=True, help="start over: read nothing from the cache (an "
                     "interrupted run of the same command otherwise resumes after its last finished step)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(o: dict) -> QuantConfig:
    from .allocate import parse_precision

    if o["device"].startswith("cuda") and not torch.cuda.is_available():
        raise Sub8Error(f"--device {o['device']}: no CUDA device is available")
    adaquant = AdaQuantConfig(mode=o["adaquant_mode"], iters=o["iters"], batch_size=o["batch_size"],
                              lr_weight=o["lr_weight"], lr_bias=o["lr_bias"], lr_weight_quant=o["lr_weight_quant"],
                              lr_input_quant=o["lr_input_quant"], lr_schedule=o["lr_schedule"],
                              holdout=o["holdout"], max_memory_gb=o["max_memory"], cache_fp16=o["cache_fp16"],
                              loss=o["adaquant_loss"], fisher_draws=o["fisher_draws"])
    allocation = AllocationConfig(
        precisions=tuple(parse_precision(p) for p in o["precisions"].split(",") if p.strip()),
        base=parse_precision(o["base_bits"]), size_ratio=o["size_ratio"], bops_ratio=o["bops_ratio"],
        latency_ms=o["latency_ms"], latency_table=o["latency_table"], max_degradation=o["max_degradation"],
        ties=tuple(o["tie"]), solver=o["solver"], first_last=o["allocate_first_last"],
        sensitivity_samples=o["sensitivity_samples"])
    bias_tuning = BiasTuningConfig(iters=o["bias_iters"], batch_size=o["bias_batch_size"], lr=o["bias_lr"],
                                   holdout=o["holdout"], input_ranges=o["bias_tune_ranges"], range_lr=o["bias_range_lr"])
    extra = {} if o["cache_dir"] is None else {"cache_dir": o["cache_dir"]}
    if o["no_cache"]:
        extra["cache_dir"] = None
    return QuantConfig(w_bits=o["w_bits"], a_bits=o["a_bits"], first_last_bits=o["first_last_bits"],
                       embedding_bits=o["embedding_bits"], quantize_attention=o["quantize_attention"],
                       layer_bits=parse_layer_bits(o["layer_bits"]), ranges=o["ranges"], percentile=o["percentile"],
                       w_symmetric=o["w_symmetric"], a_symmetric=o["a_symmetric"], pipeline=o["pipeline"],
                       steps=o["steps"], samples=o["samples"], forward_batch=o["forward_batch"], seed=o["seed"],
                       output_loss=o["output_loss"], device=o["device"], adaquant=adaquant, allocation=allocation,
                       bias_tuning=bias_tuning, **extra)


@main.command()
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
@click.option("--out", "out_dir", required=True, help="output folder")
@click.option("--force", is_flag=True, help="replace an output folder that is not a sub8 run")
@clean_errors
def quantize(eval_dir, labels, text_column, label_column, max_length, probe_train, out_dir, force, **opts):
    """Quantize a model and write OUT/report.json and OUT/model.safetensors."""
    from .data import load_images
    from .export import save
    from .export.artifact import artifact_size
    from .pipeline import quantize as run_quantize
    from .report import REPORT, atomic_dir, check_output_dir, write_json
    from .text.data import load_texts
    from .zoo import load_model

    check_output_dir(out_dir, force)
    config = build_config(opts)
    loaded = load_model(opts["model_spec"], opts["weights"])
    probe = probe_record = None
    if probe_train is not None and loaded.tokenizer is None:
        raise Sub8Error("--probe-train is for sentence encoders (text models)")
    if loaded.tokenizer is not None:  # a text model: --calib and --eval are text files
        calib_set = load_texts(opts["calib"], loaded.tokenizer, text_column, None, max_length,
                               limit=config.samples, seed=config.seed)
        calib, skipped, eval_skipped = calib_set.tokens, 0, 0
        if probe_train is not None:
            probe, probe_record = fit_probe(loaded, probe_train, eval_dir, text_column, label_column, max_length,
                                            config)
        eval_set = None if eval_dir is None else load_texts(eval_dir, loaded.tokenizer, text_column, label_column,
                                                            max_length, seed=config.seed,
                                                            classes=None if probe is None else probe.classes)
        eval_data = None if eval_set is None else eval_set.tokens
        labels = label_column or "none"
    else:
        calib_set = load_images(opts["calib"], loaded.transform, limit=config.samples, seed=config.seed,
                                role="calibration")
        calib, skipped = calib_set.images, len(calib_set.skipped)
        eval_set = None
        if eval_dir is not None:
            eval_set = load_images(eval_dir, loaded.transform, seed=config.seed, labels=labels, role="evaluation")
        eval_data = None if eval_set is None else eval_set.images
        eval_skipped = 0 if eval_set is None else len(eval_set.skipped)
    qmodel = run_quantize(loaded.module, calib, config, eval_images=eval_data,
                          eval_labels=None if eval_set is None else eval_set.labels, fresh=opts["fresh"],
                          probe=probe)
    report = qmodel.report
    if probe_record is not None:
        report["probe"] = probe_record
    report["model"] = {"spec": opts["model_spec"], "weights": opts["weights"]}
    report["calibration"].update({"folder": os.path.abspath(opts["calib"]), "skipped": skipped})
    if eval_set is not None:
        report["evaluation"] = {"folder": os.path.abspath(eval_dir), "n_images": len(eval_data),
                                "skipped": eval_skipped, "labels": labels}
    with atomic_dir(out_dir) as tmp:
        preprocessing = repr(loaded.transform if loaded.tokenizer is None else loaded.tokenizer)
        path = save(qmodel, tmp, opts["model_spec"], (1,) + tuple(calib.shape[1:]), preprocessing)
        report["artifact"] = artifact_size(path, report["size"])
        write_json(os.path.join(tmp, REPORT), report)
    print_summary(report, out_dir)


def fit_probe(loaded, path: str, eval_path: str | None, text_column: str, label_column: str | None,
              max_length: int, config):
    """The probe head fit on the float encoder's embeddings of `path`, and its report record."""
    from .evaluate import predict
    from .text.probe import Probe
    from .text.data import load_texts

    if getattr(loaded.module, "sub8_output", None) != "embedding":
        raise Sub8Error("--probe-train is for sentence encoders; a classifier has its own head")
    if label_column is None or eval_path is None:
        raise Sub8Error("--probe-train needs --eval (the test split) and --label-column")
    train = load_texts(path, loaded.tokenizer, text_column, label_column, max_length, seed=config.seed)
    embeddings = predict(loaded.module, train.tokens, config.forward_batch, "cpu")
    probe = Probe.fit(embeddings, train.labels, train.classes, seed=config.seed)
    record = {"train": os.path.abspath(path), "n_samples": len(train.tokens), "classes": train.classes,
              "head": "logistic regression on the float model's embeddings, frozen"}
    return probe, record


@main.command()
@quant_options
@click.option("--eval", "eval_dir", required=True, help="folder of evaluation images")
@click.option("--size-ratios", required=True, help="weight-memory budgets, e.g. 0.10,0.125,0.15,0.2,0.25")
@click.option("--out", "out_dir", required=True, help="output folder: pareto.json, pareto.md, pareto.svg")
@click.option("--force", is_flag=True, help="replace an output folder that is not a sub8 run")
@clean_errors
def pareto(eval_dir, size_ratios, out_dir, force, **opts):
    """Allocate, build and evaluate one model per size budget, beside the uniform precisions."""
    from .data import load_images
    from .pareto import METRIC, header, pareto as run_pareto
    from .plot import scatter_svg
    from .report import REPORT, TOOL, atomic_dir, check_output_dir, versions, write_bytes_atomic, write_json
    from .zoo import load_model

    check_output_dir(out_dir, force)
    try:
        ratios = [float(r) for r in size_ratios.split(",") if r.strip()]
    except ValueError:
        raise Sub8Error(f"--size-ratios expects numbers like 0.1,0.15, got {size_ratios!r}") from None
    if opts["pipeline"] == "rtn" and not opts["steps"]:
        opts["pipeline"] = "light"
    opts["size_ratio"] = opts["size_ratio"] or ratios[0]  # each point sets its own
    config = build_config(opts)
    loaded = load_model(opts["model_spec"], opts["weights"])
    calib = load_images(opts["calib"], loaded.transform, limit=config.samples, seed=config.seed,
                        role="calibration").images
    evals = load_images(eval_dir, loaded.transform, seed=config.seed, role="evaluation").images
    click.echo(header())
    result = run_pareto(loaded.module, calib, evals, config, ratios, echo=click.echo)
    result.update({"tool": TOOL, "model": opts["model_spec"], "config": config.to_dict(), "versions": versions()})
    good = [r for r in result["points"] if "error" not in r]
    svg = scatter_svg([{"name": "allocated", "color": "#1f77b4", "line": True,
                        "points": [(r["size_ratio"], r["metrics"][METRIC] or 0.0, None) for r in good]},
                       {"name": "uniform", "color": "#d62728",
                        "points": [(r["size_ratio"], r["metrics"][METRIC] or 0.0, r["precision"])
                                   for r in result["uniform"]]}],
                      "weight memory / float32", "confident top-1 agreement", f"{opts['model_spec']}: Pareto front")
    lines = ["| model | size ratio | BOPs ratio | conf top-1 | top-1 | KL |", "|---|---|---|---|---|---|"]
    for label, r in [(f"size <= {r['budget']:g}", r) for r in result["points"]] + \
                    [(f"uniform {r['precision']}", r) for r in result["uniform"]]:
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | |")
        else:
            m = r["metrics"]
            lines.append(f"| {label} | {r['size_ratio']:.4f} | {r['bops_ratio']:.4f} | {m[METRIC] or 0:.3f} | "
                         f"{m['top1_agreement']:.3f} | {m['kl']:.3f} |")
    with atomic_dir(out_dir) as tmp:
        write_json(os.path.join(tmp, "pareto.json"), result)
        write_bytes_atomic(os.path.join(tmp, "pareto.md"), ("\n".join(lines) + "\n").encode())
        write_bytes_atomic(os.path.join(tmp, "pareto.svg"), svg.encode())
        write_json(os.path.join(tmp, REPORT), {"tool": TOOL, "command": "pareto", "model": opts["model_spec"]})
    click.echo(f"  wrote {os.path.join(out_dir, 'pareto.json')}, pareto.md and pareto.svg")


@main.command("export")
@click.argument("run_dir")
@click.option("--onnx", "onnx_path", required=True, help="write the ONNX QDQ graph here (opset 21)")
@clean_errors
def export(run_dir, onnx_path):
    """Export the quantized model of RUN_DIR (a `sub8 quantize` output folder)."""
    from .export.onnx_qdq import export_onnx

    record = export_onnx(run_dir, onnx_path)
    kinds = collections.Counter(f"W:{v['weight'] or 'float'} A:{v['input'] or 'float'}"
                                for v in record["layers"].values())
    click.echo(f"wrote {record['path']} ({record['bytes'] / 2 ** 20:.2f} MiB, opset {record['opset']}, "
               f"{len(record['layers'])} quantized layers, {record['integer_kernel_layers']} of them "
               f"W8A8 convolutions with symmetric weights, which ONNX Runtime fuses into integer kernels)")
    for kind, n in kinds.most_common():
        click.echo(f"  {n:4d} x {kind}")


def print_summary(report: dict, out_dir: str) -> None:
    c = report["config"]
    layers = report["layers"]
    recipe = ",".join(c["steps"]) if c["steps"] else c["pipeline"]
    click.echo(f"sub8: {report['model']['spec']}  steps={recipe}  W{fmt_bits(c['w_bits'])}"
               f"A{fmt_bits(c['a_bits'])}  first/last="
               f"{'allocated' if 'allocate' in report and c['allocation']['first_last'] else fmt_bits(c['first_last_bits'])}"
               f"  ranges={c['ranges']}")
    click.echo(f"  {len(layers)} layers quantized on {report['calibration']['n_images']} calibration samples;"
               f" weight size {report['size']['weight_bits'] / 8e6:.2f} MB"
               f" ({100 * report['size']['ratio']:.1f}% of float32)")
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
    click.echo(f"  wrote {os.path.join(out_dir, 'report.json')} and {os.path.join(out_dir, 'model.safetensors')}")


@main.command()
@click.option("--model", "model_spec", default="zoo:mobilenet_v2", show_default=True)
@click.option("--ranges", type=click.Choice(METHODS), default="mse", show_default=True)
@click.option("--photos", default=None, help="where to write the demo crops (default: a cache folder)")
@click.option("--out", "out_path", default=None, help="also write the table as JSON here")
@click.option("--seed", default=0, show_default=True)
@clean_errors
def demo(model_spec, ranges, photos, out_path, seed):
    """Quantize the default model on the embedded photos at W8A8, W4A8 and W4A4 (RTN)."""
    from .demo import run_demo
    run_demo(model_spec, ranges, photos, out_path, seed, echo=click.echo)


if __name__ == "__main__":
    main()
