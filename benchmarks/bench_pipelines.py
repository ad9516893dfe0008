"""The paper's ablation in one run: agreement with the float model after every step of a
pipeline (default: ranges -> AdaQuant -> BN tuning -> bias tuning), on the benchmark photos.

    python benchmarks/bench_pipelines.py --photos data/bench-photos [--bits W4A4] \
        [--steps ranges,adaquant,bn_tuning,bias_tuning | --pipeline advanced --size-ratio 0.14] \
        [--iters 1000] [--batch-size 50] [--lr-weight 1e-3] [--bias-iters 200] [--samples 256]

First and last layers stay at 8 bits. Prints a table; writes the report as JSON
(default benchmarks/results/pipelines.json).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.allocate import parse_precision  # noqa: E402
from sub8.config import AdaQuantConfig, AllocationConfig, BiasTuningConfig  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--steps", default="ranges,adaquant,bn_tuning,bias_tuning")
    ap.add_argument("--pipeline", default=None, help="instead of --steps: light or advanced")
    ap.add_argument("--size-ratio", type=float, default=None)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sensitivity-samples", type=int, default=None)
    ap.add_argument("--iters", type=int, default=AdaQuantConfig.iters)
    ap.add_argument("--batch-size", type=int, default=AdaQuantConfig.batch_size)
    ap.add_argument("--lr-weight", type=float, default=AdaQuantConfig.lr_weight)
    ap.add_argument("--bias-iters", type=int, default=BiasTuningConfig.iters)
    ap.add_argument("--bias-batch-size", type=int, default=BiasTuningConfig.batch_size)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "pipelines.json"))
    args = ap.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples).images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform).images
    w, a = parse_precision(args.bits)
    recipe = {"pipeline": args.pipeline} if args.pipeline else {"steps": tuple(args.steps.split(","))}
    config = QuantConfig(w_bits=w, a_bits=a, samples=args.samples, device=args.device, **recipe,
                         adaquant=AdaQuantConfig(iters=args.iters, batch_size=args.batch_size, lr_weight=args.lr_weight),
                         allocation=AllocationConfig(size_ratio=args.size_ratio,
                                                     sensitivity_samples=args.sensitivity_samples),
                         bias_tuning=BiasTuningConfig(iters=args.bias_iters, batch_size=args.bias_batch_size))
    report = quantize(loaded.module.eval(), calib, config, eval_images=evals, fresh=True).report
    print(f"{args.model} {args.bits} (first/last 8 bits): {len(calib)} calibration / {len(evals)} evaluation "
          f"images; AdaQuant {args.iters} it x {args.batch_size}, lr_weight {args.lr_weight}; "
          f"bias tuning {args.bias_iters} it")
    print(f"{'after step':<20} {'conf top1':>9} {'top1':>6} {'top5':>6} {'KL':>7} {'seconds':>8} {'RSS MB':>7}")
    for step in report["steps"]:
        if "metrics" not in step:
            continue
        m = step["metrics"]
        print(f"{step['name']:<20} {m['top1_agreement_confident']:9.3f} {m['top1_agreement']:6.3f} "
              f"{m['top5_agreement']:6.3f} {m['kl']:7.3f} {step['seconds']:8.1f} {step['peak_rss_mb']:7.0f}")
    print(f"size ratio {report['size']['ratio']:.4f}")
    write_json_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
