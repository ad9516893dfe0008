"""RTN on MobileNetV2: time and peak memory of preparation, calibration and evaluation, and the
fidelity of each range method, on the benchmark photo set (benchmarks/build_photo_set.py).

    python benchmarks/bench_rtn.py --photos data/bench-photos [--json out.json]

Prints one table; writes the same rows as JSON (default benchmarks/results/rtn.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import predict  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

RECIPES = {"rtn": ("ranges",), "rtn+bc": ("ranges", "bias_correction")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images")
    ap.add_argument("--runs", default="W8A8:minmax:rtn,W8A8:percentile:rtn,W8A8:mse:rtn,"
                                      "W8A8:minmax:rtn+bc,W8A8:percentile:rtn+bc,W8A8:mse:rtn+bc,"
                                      "W4A8:minmax:rtn,W4A8:mse:rtn,W4A8:mse:rtn+bc,"
                                      "W4A4:minmax:rtn,W4A4:mse:rtn,W4A4:mse:rtn+bc",
                    help="comma-separated WxAy:ranges:recipe")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "rtn.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples)
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform, limit=args.eval_limit)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    float_logits = predict(loaded.module, evals.images)
    float_eval_s = time.perf_counter() - t0
    print(f"{args.model}: {len(calib.images)} calibration / {len(evals.images)} evaluation images "
          f"(load {load_s:.1f} s, float eval {float_eval_s:.1f} s, torch threads {torch.get_num_threads()})")
    head = (f"{'bits':<5} {'ranges':<10} {'recipe':<7} {'top1':>6} {'top1@c':>6} {'top5':>6} {'KL':>7} "
            f"{'prep s':>6} {'calib s':>7} {'eval s':>6} {'peak MB':>7}")
    print(head)
    rows = []
    for run in args.runs.split(","):
        bits, ranges, recipe = run.split(":")
        w, a = bits[1:].split("A")
        config = QuantConfig(w_bits=int(w), a_bits=int(a), ranges=ranges, steps=RECIPES[recipe])
        q = quantize(loaded.module, calib.images, config, eval_images=evals.images, float_logits=float_logits)
        steps = {s["name"]: s for s in q.report["steps"]}
        m = q.report["metrics"]["quantized"]
        calib_s = sum(s["seconds"] for n, s in steps.items() if n not in ("prepare", "evaluate"))
        peak = max(s["peak_rss_mb"] for s in steps.values())
        row = {"bits": bits, "ranges": ranges, "recipe": recipe, "metrics": m, "size": q.report["size"],
               "steps": q.report["steps"], "calibrate_seconds": calib_s, "peak_rss_mb": peak}
        rows.append(row)
        print(f"{bits:<5} {ranges:<10} {recipe:<7} {100 * m['top1_agreement']:6.1f} "
              f"{100 * m['top1_agreement_confident']:6.1f} {100 * m['top5_agreement']:6.1f} {m['kl']:7.4f} "
              f"{steps['prepare']['seconds']:6.1f} {calib_s:7.1f} {steps['evaluate']['seconds']:6.1f} {peak:7.0f}",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json_result(args.json, {"model": args.model, "photos": os.path.abspath(args.photos),
                           "n_calib": len(calib.images), "n_eval": len(evals.images),
                           "n_confident": rows[0]["metrics"]["n_confident"] if rows else None,
                           "float_eval_seconds": float_eval_s, "versions": versions(), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
