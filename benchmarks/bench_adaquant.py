"""AdaQuant cost: the whole AdaQuant step's seconds, the optimization loops' cost per iteration
summed over all layers, and peak host (and GPU) memory; grouped (all layers of a cache group in
one loop) vs one layer at a time, in one run.

    python benchmarks/bench_adaquant.py --photos data/bench-photos [--model zoo:mobilenet_v2] \
        [--samples 128] [--iters 5] [--schedules grouped,one] [--device cpu|cuda]

`--model torchvision:resnet50` runs with random weights (timing only). When --samples is over
the calibration folder's count, evaluation photos fill up the rest (timing only).
Prints a table; writes JSON (default benchmarks/results/adaquant_speed.json).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from sub8 import QuantConfig, calibrate_ranges, prepare  # noqa: E402
from sub8.calibrate import AdaQuantConfig, adaquant  # noqa: E402
adaquant_module = importlib.import_module("sub8.calibrate.adaquant")  # the name `adaquant` is the function
from sub8.data import load_images  # noqa: E402
from sub8.report import StepLog, versions, write_json  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def load_samples(photos: str, transform, n: int) -> torch.Tensor:
    images = load_images(os.path.join(photos, "calib"), transform, limit=n).images
    if len(images) < n:
        more = load_images(os.path.join(photos, "eval"), transform, limit=n - len(images)).images
        images = torch.cat([images, more])
    return images


@contextlib.contextmanager
def one_layer_per_group(enabled: bool):
    """Make AdaQuant's cache plan put every layer in a group of its own."""
    real = adaquant_module.plan_groups

    def singles(names, cost, budget):
        return [[name] for group in real(names, cost, budget) for name in group]

    if enabled:
        adaquant_module.plan_groups = singles
    try:
        yield
    finally:
        adaquant_module.plan_groups = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--max-memory", type=float, default=4.0, help="GB bound on the activation cache")
    ap.add_argument("--schedules", default="grouped,one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adaquant_speed.json"))
    args = ap.parse_args(argv)

    loaded = load_model(args.model, architecture_only=True)
    calib = load_samples(args.photos, loaded.transform, args.samples).to(args.device)
    w, a = (int(v) for v in args.bits.upper().lstrip("W").split("A"))
    print(f"{args.model}, {len(calib)} calibration images, {args.bits}, {args.iters} iterations, "
          f"mini-batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'schedule':<16} {'groups':>6} {'step s':>8} {'loop s/iter (all layers)':>24} {'RSS MB':>8} "
          f"{'CUDA MB':>8}")
    rows = []
    for schedule in args.schedules.split(","):
        p = prepare(loaded.module, calib[:1], QuantConfig(w_bits=w, a_bits=a, device=args.device))
        calibrate_ranges(p, calib, "minmax")
        cfg = AdaQuantConfig(iters=args.iters, batch_size=args.batch_size, max_memory_gb=args.max_memory)
        log = StepLog()
        with log.step("adaquant", args.device), one_layer_per_group(schedule == "one"):
            rec = adaquant(p, calib, cfg, show_progress=False)
        step = log.steps[0]
        row = {"schedule": schedule, "groups": rec["groups"], "seconds": step["seconds"],
               "optimize_seconds": rec["optimize_seconds"], "seconds_per_iter": rec["seconds_per_iter"],
               "peak_rss_mb": step["peak_rss_mb"], "peak_cuda_mb": step.get("peak_cuda_mb"),
               "peak_cache_mb": rec["peak_cache_mb"]}
        rows.append(row)
        print(f"{schedule:<16} {rec['groups']:>6} {row['seconds']:8.1f} {row['seconds_per_iter']:24.3f} "
              f"{row['peak_rss_mb']:8.0f} {row['peak_cuda_mb'] or 0:8.0f}", flush=True)
    if len(rows) == 2:
        print(f"per-iteration time ratio {rows[0]['schedule']} / {rows[1]['schedule']}: "
              f"{rows[0]['seconds_per_iter'] / rows[1]['seconds_per_iter']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, {"model": args.model, "n_calib": len(calib), "iters": args.iters,
                           "batch_size": args.batch_size, "bits": args.bits, "device": args.device,
                           "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
