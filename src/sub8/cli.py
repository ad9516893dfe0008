"""The `sub8` command line: the same steps as the Python API."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import click
import torch

from .config import ADAQUANT_MODES, LR_SCHEDULES, AdaQuantConfig, QuantConfig, parse_layer_bits
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


@main.command()
@click.option("--model", "model_spec", required=True, help="zoo:NAME, torchvision:NAME or python:pkg.mod:fn")
@click.option("--weights", default=None, help="state dict file for torchvision:/python: models")
@click.option("--calib", required=True, help="folder of calibration images (searched recursively)")
@click.option("--eval", "eval_dir", default=None, help="folder of evaluation images")
@click.option("--labels", type=click.Choice(["none", "folders"]), default="none",
              help="'folders': the eval folder's class sub-folders give labels")
@click.option("--w-bits", default="4", show_default=True, help="weight bits 2..8 or float")
@click.option("--a-bits", default="4", show_default=True, help="activation bits 2..8 or float")
@click.option("--first-last-bits", default="8", show_default=True, help="bits of the first and last layer")
@click.option("--layer-bits", multiple=True, help="PATTERN=W[,A] per-layer bits by name pattern (repeatable)")
@click.option("--pipeline", default="rtn", show_default=True, help="rtn or adaquant (ranges, then AdaQuant)")
@click.option("--steps", default=None, help="explicit step list, e.g. ranges,bias_correction")
@click.option("--ranges", type=click.Choice(METHODS), default="mse", show_default=True)
@click.option("--percentile", default=99.99, show_default=True, help="for --ranges percentile")
@click.option("--w-symmetric", is_flag=True, help="symmetric weight grids (default asymmetric)")
@click.option("--a-symmetric", is_flag=True, help="symmetric activation grids (default asymmetric)")
@click.option("--samples", default=256, show_default=True, help="calibration images to use")
@click.option("--forward-batch", default=32, show_default=True, help="images per forward pass")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--adaquant", "adaquant_mode", type=click.Choice(ADAQUANT_MODES), default="parallel",
              show_default=True, help="AdaQuant inputs: float (parallel) or quantized model's (sequential)")
@click.option("--iters", default=AdaQuantConfig.iters, show_default=True, help="AdaQuant iterations per layer")
@click.option("--batch-size", default=AdaQuantConfig.batch_size, show_default=True, help="AdaQuant mini-batch")
@click.option("--lr-weight", default=AdaQuantConfig.lr_weight, show_default=True)
@click.option("--lr-bias", default=AdaQuantConfig.lr_bias, show_default=True)
@click.option("--lr-weight-quant", default=AdaQuantConfig.lr_weight_quant, show_default=True,
              help="relative rate of the weight steps (log space)")
@click.option("--lr-input-quant", default=AdaQuantConfig.lr_input_quant, show_default=True,
              help="relative rate of the input steps (log space)")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=AdaQuantConfig.lr_schedule,
              show_default=True, help="AdaQuant learning rates: cosine decay to 0, or constant")
@click.option("--holdout", default=AdaQuantConfig.holdout, show_default=True,
              help="share of calibration samples kept out of AdaQuant to measure it")
@click.option("--max-memory", default=AdaQuantConfig.max_memory_gb, show_default=True,
              help="GB bound on AdaQuant's cached activations")
@click.option("--cache-fp16", is_flag=True, help="cache AdaQuant activations in float16")
@click.option("--out", "out_dir", required=True, help="output folder")
@click.option("--force", is_flag=True, help="replace an output folder that is not a sub8 run")
@clean_errors
def quantize(model_spec, weights, calib, eval_dir, labels, w_bits, a_bits, first_last_bits, layer_bits,
             pipeline, steps, ranges, percentile, w_symmetric, a_symmetric, samples, forward_batch, seed, device,
             adaquant_mode, iters, batch_size, lr_weight, lr_bias, lr_weight_quant, lr_input_quant, lr_schedule,
             holdout, max_memory, cache_fp16, out_dir, force):
    """Quantize a model and write OUT/report.json and OUT/model.pt."""
    from .data import load_images
    from .pipeline import quantize as run_quantize
    from .report import REPORT, atomic_dir, check_output_dir, write_json
    from .saving import save
    from .zoo import load_model

    check_output_dir(out_dir, force)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Sub8Error(f"--device {device}: no CUDA device is available")
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits,
                         layer_bits=parse_layer_bits(layer_bits), ranges=ranges, percentile=percentile,
                         w_symmetric=w_symmetric, a_symmetric=a_symmetric, pipeline=pipeline, steps=steps,
                         samples=samples, forward_batch=forward_batch, seed=seed, device=device,
                         adaquant=AdaQuantConfig(mode=adaquant_mode, iters=iters, batch_size=batch_size,
                                                 lr_weight=lr_weight, lr_bias=lr_bias,
                                                 lr_weight_quant=lr_weight_quant, lr_input_quant=lr_input_quant,
                                                 lr_schedule=lr_schedule, holdout=holdout, max_memory_gb=max_memory,
                                                 cache_fp16=cache_fp16))
    loaded = load_model(model_spec, weights)
    calib_set = load_images(calib, loaded.transform, limit=samples, seed=seed, role="calibration")
    eval_set = None
    if eval_dir is not None:
        eval_set = load_images(eval_dir, loaded.transform, seed=seed, labels=labels, role="evaluation")
    qmodel = run_quantize(loaded.module, calib_set.images, config,
                          eval_images=None if eval_set is None else eval_set.images,
                          eval_labels=None if eval_set is None else eval_set.labels)
    report = qmodel.report
    report["model"] = {"spec": model_spec, "weights": weights}
    report["calibration"].update({"folder": os.path.abspath(calib), "skipped": len(calib_set.skipped)})
    if eval_set is not None:
        report["evaluation"] = {"folder": os.path.abspath(eval_dir), "n_images": len(eval_set.paths),
                                "skipped": len(eval_set.skipped), "labels": labels}
    with atomic_dir(out_dir) as tmp:
        save(qmodel, tmp, model_spec, tuple(calib_set.images[:1].shape))
        write_json(os.path.join(tmp, REPORT), report)
    print_summary(report, out_dir)


def print_summary(report: dict, out_dir: str) -> None:
    c = report["config"]
    layers = report["layers"]
    recipe = ",".join(c["steps"]) if c["steps"] else c["pipeline"]
    click.echo(f"sub8: {report['model']['spec']}  steps={recipe}  W{fmt_bits(c['w_bits'])}"
               f"A{fmt_bits(c['a_bits'])}  first/last={fmt_bits(c['first_last_bits'])}  ranges={c['ranges']}")
    click.echo(f"  {len(layers)} layers quantized on {report['calibration']['n_images']} calibration images;"
               f" weight size {report['size']['weight_bits'] / 8e6:.2f} MB"
               f" ({100 * report['size']['ratio']:.1f}% of float32)")
    for step in report["steps"]:
        click.echo(f"  step {step['name']:<10} {step['seconds']:7.1f} s  peak RSS {step['peak_rss_mb']:7.0f} MB")
    if "metrics" in report:
        m = report["metrics"]
        labelled = "accuracy" in m["float"]
        click.echo(f"  evaluated on {m['float']['n_images']} images "
                   f"({m['float']['n_confident']} confident: float top probability >= 0.5)")
        click.echo("  " + table_header(labelled))
        click.echo("  " + metrics_line("float", m["float"], 1.0))
        click.echo("  " + metrics_line("quantized", m["quantized"], report["size"]["ratio"]))
    click.echo(f"  wrote {os.path.join(out_dir, 'report.json')} and {os.path.join(out_dir, 'model.pt')}")


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
