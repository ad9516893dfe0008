"""AdaQuant cost: the whole AdaQuant step's seconds, its cost per iteration summed over all
layers, and its peak host (and GPU) memory; grouped (all layers of a cache group in one loop)
vs one layer at a time, in one run.

    python benchmarks/bench_adaquant.py --photos data/bench-photos [--model zoo:mobilenet_v2] \
        [--samples 128] [--iters 5] [--schedules grouped,one] [--device cpu|cuda]

`--model torchvision:resnet50` runs with random weights (timing only). When --samples is over
the calibration folder's count, evaluation photos fill up the rest (timing only).
Prints a table; writes JSON (default benchmarks/results/adaquant_speed.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from sub8 import QuantConfig, calibrate_ranges, prepare  # noqa: E402
from sub8.calibrate import AdaQuantConfig, adaquant  # noqa: E402
from sub8.calibrate.adaquant import per_sample_bytes  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.report import StepLog, versions, write_json  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def load_samples(photos: str, transform, n: int) -> torch.Tensor:
    images = load_images(os.path.join(photos, "calib"), transform, limit=n).images
    if len(images) < n:
        more = load_images(os.path.join(photos, "eval"), transform, limit=n - len(images)).images
        images = torch.cat([images, more])
    return images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--max-memory", type=float, default=4.0, help="GB, for the grouped schedule")
    ap.add_argument("--schedules", default="grouped,one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adaquant_speed.json"))
    args = ap.parse_args(argv)

    loaded = load_model(args.model, architecture_only=True)
    calib = load_samples(args.photos, loaded.transform, args.samples).to(args.device)
    w, a = (int(v) for v in args.bits.upper().lstrip("W").split("A"))
    print(f"{args.model}, {len(calib)} calibration images, {args.bits}, {args.iters} iterations, "
          f"mini-batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'schedule':<16} {'groups':>6} {'step s':>8} {'s/iter (all layers)':>20} {'RSS MB':>8} {'CUDA MB':>8}")
    rows = []
    for schedule in args.schedules.split(","):
        p = prepare(loaded.module, calib[:1], QuantConfig(w_bits=w, a_bits=a, device=args.device))
        calibrate_ranges(p, calib, "minmax")
        budget = args.max_memory
        if schedule == "one":  # a budget that fits the biggest layer alone: one layer per group
            budget = max(per_sample_bytes(p, calib, 4).values()) * len(calib) * 1.0001 / 2 ** 30
        cfg = AdaQuantConfig(iters=args.iters, batch_size=args.batch_size, max_memory_gb=budget)
        log = StepLog()
        with log.step("adaquant", args.device):
            rec = adaquant(p, calib, cfg, show_progress=False)
        step = log.steps[0]
        row = {"schedule": schedule, "groups": rec["groups"], "seconds": step["seconds"],
               "seconds_per_iter": step["seconds"] / args.iters, "peak_rss_mb": step["peak_rss_mb"],
               "peak_cuda_mb": step.get("peak_cuda_mb"), "peak_cache_mb": rec["peak_cache_mb"]}
        rows.append(row)
        print(f"{schedule:<16} {rec['groups']:>6} {row['seconds']:8.1f} {row['seconds_per_iter']:20.3f} "
              f"{row['peak_rss_mb']:8.0f} {row['peak_cuda_mb'] or 0:8.0f}", flush=True)
    if len(rows) == 2:
        print(f"time ratio {rows[0]['schedule']} / {rows[1]['schedule']}: "
              f"{rows[0]['seconds'] / rows[1]['seconds']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, {"model": args.model, "n_calib": len(calib), "iters": args.iters,
                           "batch_size": args.batch_size, "bits": args.bits, "device": args.device,
                           "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
