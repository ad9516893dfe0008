"""AdaQuant cost on MobileNetV2: seconds per iteration summed over all layers (mini-batch 50),
grouped (all layers of a cache group in one loop) vs one layer at a time, in one run.

    python benchmarks/bench_adaquant.py --photos data/bench-photos [--samples 128] [--iters 5]

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
from sub8.data import load_images  # noqa: E402
from sub8.report import versions, write_json  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adaquant_speed.json"))
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples).images
    rows = []
    print(f"{args.model}, {len(calib)} calibration images, W4A4, {args.iters} iterations, mini-batch 50, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'schedule':<16} {'groups':>6} {'total s':>8} {'s/iter (all layers)':>20}")
    for schedule, budget in (("grouped", 8.0), ("one layer/time", None)):
        config = QuantConfig(w_bits=4, a_bits=4, device=args.device)
        p = prepare(loaded.module, calib[:1], config)
        calibrate_ranges(p, calib.to(args.device), "minmax")
        cfg = AdaQuantConfig(iters=args.iters, max_memory_gb=budget or 8.0)
        if budget is None:  # a budget that fits one layer at most forces one layer per group
            from sub8.calibrate.adaquant import per_sample_bytes
            cfg.max_memory_gb = max(per_sample_bytes(p, calib, 4).values()) * len(calib) * 1.0001 / 2 ** 30
        start = time.perf_counter()
        rec = adaquant(p, calib.to(args.device), cfg, show_progress=False)
        total = time.perf_counter() - start
        # Time of the optimization loops alone: total minus the cache passes is not separable here,
        # so report the whole step and the per-iteration share of it.
        rows.append({"schedule": schedule, "groups": rec["groups"], "seconds": total,
                     "seconds_per_iter": total / args.iters, "peak_cache_mb": rec["peak_cache_mb"]})
        print(f"{schedule:<16} {rec['groups']:>6} {total:8.1f} {total / args.iters:20.2f}", flush=True)
    print(f"grouped / one-at-a-time time ratio: {rows[0]['seconds'] / rows[1]['seconds']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, {"model": args.model, "n_calib": len(calib), "iters": args.iters,
                           "device": args.device, "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
