"""`sub8 demo`: the default model on the embedded photos, RTN at W8A8, W4A8 and W4A4."""

from __future__ import annotations

import os
import time

from .adapters import ImageAdapter, adapter_for
from .config import QuantConfig
from .data import load_images
from .data.demo import DEMO_SET_VERSION, build_demo_set
from .errors import Sub8Error
from .evaluate import compare, predict
from .pipeline import quantize
from .report import write_json
from .table import metrics_line, table_header
from .zoo import load_model

DEMO_CONFIGS = ((8, 8), (4, 8), (4, 4))
# Plain RTN, then RTN with empirical bias correction (see calibrate/bias_correction.py).
DEMO_RECIPES = (("rtn", ("ranges",)), ("rtn+bc", ("ranges", "bias_correction")))


def default_photo_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "sub8", f"demo-photos-v{DEMO_SET_VERSION}")


def run_demo(model_spec: str, ranges: str, photos: str | None, out_path: str | None, seed: int,
             echo=print) -> list[dict]:
    loaded = load_model(model_spec)
    adapter = adapter_for(loaded.module)
    if not isinstance(adapter, ImageAdapter):
        raise Sub8Error(f"sub8 demo quantizes an image model on photos; {model_spec} is a {adapter.kind} model "
                        f"(use sub8 quantize with text files)")
    calib_dir, eval_dir = build_demo_set(photos or default_photo_dir())
    calib = load_images(calib_dir, loaded.transform, seed=seed, role="calibration")
    evals = load_images(eval_dir, loaded.transform, seed=seed, role="evaluation")
    float_logits = predict(loaded.module, evals.images)
    float_metrics = compare(float_logits, float_logits)
    echo(f"sub8 demo: {model_spec}, round-to-nearest with {ranges} ranges (rtn), and with bias "
         f"correction (rtn+bc); first/last layers at 8 bits")
    echo(f"  {len(calib.images)} calibration crops and {len(evals.images)} evaluation crops of "
         f"scikit-image's photos (disjoint source photos); {float_metrics['n_confident']} evaluation "
         f"crops are confident (float top probability >= 0.5)")
    echo("  top1/top5: agreement with the float model; top1@conf: on the confident crops; "
         "KL: mean KL(float || quantized)")
    echo("  " + table_header(False))
    echo("  " + metrics_line("float", float_metrics, 1.0))
    rows = []
    for w, a in DEMO_CONFIGS:
        for recipe, steps in DEMO_RECIPES:
            start = time.perf_counter()
            config = QuantConfig(w_bits=w, a_bits=a, ranges=ranges, steps=steps, seed=seed)
            q = quantize(loaded.module, calib.images, config, eval_images=evals.images,
                         float_logits=float_logits)
            m = q.report["metrics"]["quantized"]
            name = f"W{w}A{a} {recipe}"
            echo("  " + metrics_line(name, m, q.report["size"]["ratio"]))
            rows.append({"config": name, "steps": list(steps), "metrics": m, "size": q.report["size"],
                         "seconds": time.perf_counter() - start})
    if out_path:
        write_json(out_path, {"model": model_spec, "ranges": ranges, "float": float_metrics, "rows": rows})
    return rows
