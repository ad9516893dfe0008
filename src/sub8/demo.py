"""`sub8 demo`: the default model on the embedded photos, from W8A8 to W4A4: round to nearest,
sub8's default recipe, sequential AdaQuant at the CPU setting, and one mixed-precision point."""

from __future__ import annotations

import os
import time

from . import progress
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

# Sequential AdaQuant at its CPU budget (the paper's 1000 iterations per layer take a GPU); the
# units are blocks, the default (with QDrop below 8-bit activations).
CPU_ADAQUANT = {"mode": "sequential", "budget": "cpu"}
# The demo's row runs 40 iterations per block instead of the budget's 100: at 100 its AdaQuant
# took 208 s of the 4 minutes, the whole demo 333 s (a block's iteration costs more than a
# layer's; its units are fewer).
DEMO_ADAQUANT = {**CPU_ADAQUANT, "iters": 40}

# The demo's budget is 4 minutes on 2 cores. Its light pipeline tunes biases for 15 iterations
# (the default 200 take about 5 minutes) and measures sensitivities on 40 crops; sequential
# AdaQuant runs once, at W4A8, on the first ADAQUANT_CROPS crops (its sequential input caching
# grows with the crops: about 105 s on 48 against 125 s on all 80).
DEMO_BIAS_ITERS = 15
DEMO_SENSITIVITY_CROPS = 40
ADAQUANT_CROPS = 48

# (row label, what it shows, QuantConfig settings, calibration crops used or None for all).
DEMO_ROWS = (
    ("W8A8 rtn", "round to nearest", dict(w_bits=8, a_bits=8, pipeline="rtn"), None),
    ("W8A8 default", "sub8's default: ranges, channel equalization, bias correction, requantized junctions", dict(w_bits=8, a_bits=8),
     None),
    ("W4A8 rtn", "round to nearest", dict(w_bits=4, a_bits=8, pipeline="rtn"), None),
    ("W4A8 adaquant", f"sequential AdaQuant (blocks), CPU budget at 40 iterations, first {ADAQUANT_CROPS} crops",
     dict(w_bits=4, a_bits=8, pipeline="adaquant", adaquant=DEMO_ADAQUANT), ADAQUANT_CROPS),
    ("W4A4 rtn", "round to nearest", dict(w_bits=4, a_bits=4, pipeline="rtn"), None),
    ("mixed 0.20", f"light pipeline: W8A8 or W4A4 per layer by integer programming, size <= 0.20 "
     f"({DEMO_BIAS_ITERS} bias tuning iterations)",
     dict(pipeline="light", allocation={"size_ratio": 0.20, "precisions": ((8, 8), (4, 4)),
                                        "sensitivity_samples": DEMO_SENSITIVITY_CROPS},
          bias_tuning={"iters": DEMO_BIAS_ITERS}), None),
)


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
    echo(f"sub8 demo: {model_spec}; first/last layers at 8 bits; {ranges} ranges")
    echo(f"  {len(calib.images)} calibration crops and {len(evals.images)} evaluation crops of "
         f"scikit-image's photos (disjoint source photos); {float_metrics['n_confident']} evaluation "
         f"crops are confident (float top probability >= 0.5)")
    echo("  top1/top5: agreement with the float model; top1@conf: on the confident crops; "
         "KL: mean KL(float || quantized); size: weight memory / float32")
    for label, what, _, _ in DEMO_ROWS:
        echo(f"  {label:<13} {what}")
    echo("  " + table_header(False) + "  seconds")
    echo("  " + metrics_line("float", float_metrics, 1.0))
    rows = []
    for label, _, settings, crops in DEMO_ROWS:
        start = time.perf_counter()
        config = QuantConfig(ranges=ranges, seed=seed, cache_dir=None, **settings)
        with progress.without_stage_lines():  # (the table's rows say what runs)
            q = quantize(loaded.module, calib.images[:crops], config, eval_images=evals.images,
                         float_logits=float_logits, step_metrics=False)  # (the table shows the last)
        m = q.report["metrics"]["quantized"]
        seconds = time.perf_counter() - start
        echo("  " + metrics_line(label, m, q.report["size"]["ratio"]) + f"  {seconds:7.1f}")
        rows.append({"config": label, "steps": [s["name"] for s in q.report["steps"]], "metrics": m,
                     "size": q.report["size"], "seconds": seconds})
    if out_path:
        write_json(out_path, {"model": model_spec, "ranges": ranges, "float": float_metrics, "rows": rows})
    return rows
