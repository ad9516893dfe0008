"""Bit allocation by integer programming vs uniform precision and a greedy allocation, on a zoo
model with the benchmark photo set: range calibration then allocation (`--after bn_tuning,bias_tuning`
adds the rest of the light pipeline).

    python benchmarks/bench_allocation.py --photos data/bench-photos [--samples 256] \
        [--size-precisions W8A8,W6A8,W4A8,W3A8,W2A8] [--bops-precisions W8A8,W4A8,W4A4,W2A4] \
        [--pareto 0.10,0.125,0.15,0.175,0.20,0.25] [--size-only | --bops-only] \
        [--after bn_tuning,bias_tuning]

1. Weight memory as the only budget, at the size of uniform W4A8 (activations then cost
   nothing, so every candidate has 8-bit activations): milp vs greedy vs uniform W4A8.
2. BOPs as the only budget, at the BOPs of uniform W4A4: milp vs greedy vs uniform W4A4.
3. The cost of a second solve (sensitivities cached) against the first run.
4. The Pareto front over size budgets, beside the uniform precisions.
Writes JSON (default benchmarks/results/allocation.json) after each row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.allocate import parse_precision, precision_label  # noqa: E402
from sub8.allocate.costs import bops  # noqa: E402
from sub8.config import AllocationConfig  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import predict  # noqa: E402
from sub8.adapters import prepare  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.size import size_report  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def uniform_costs(model, example, p) -> tuple[float, float]:
    """(size ratio, BOPs ratio) of the model at uniform precision p (first/last at 8 bits)."""
    prepared = prepare(model, example, QuantConfig(w_bits=p[0], a_bits=p[1]))
    total = sum(bops(i.macs, (i.w_bits, i.a_bits)) for i in prepared.layers)
    ref = sum(bops(i.macs, (None, None)) for i in prepared.layers)
    return size_report(prepared)["ratio"], total / ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sensitivity-samples", type=int, default=None, help="default: all calibration samples")
    ap.add_argument("--size-precisions", default="W8A8,W6A8,W4A8,W3A8,W2A8")
    ap.add_argument("--bops-precisions", default="W8A8,W4A8,W4A4,W2A4")
    ap.add_argument("--pareto", default="0.10,0.125,0.15,0.175,0.20,0.25")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (a cold first run)")
    ap.add_argument("--uniform-only", action="store_true", help="only the uniform-precision rows")
    ap.add_argument("--size-only", action="store_true", help="only the weight-memory experiment")
    ap.add_argument("--bops-only", action="store_true", help="only the BOPs experiment")
    ap.add_argument("--after", default="", help="steps after allocation, e.g. bn_tuning (default: none)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "allocation.json"))
    args = ap.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sub8-bench-cache-")
    loaded = load_model(args.model)
    model = loaded.module.eval()
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples).images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform).images
    float_logits = predict(model, evals, 64)
    print(f"{args.model}: {len(calib)} calibration / {len(evals)} evaluation images; cache {cache_dir}", flush=True)
    print(f"{'experiment':<12} {'model':<22} {'size ratio':>10} {'BOPs ratio':>10} {'conf top1':>9} {'top1':>6} "
          f"{'KL':>7} {'pred dL':>8} {'meas dL':>8} {'seconds':>8}", flush=True)
    rows = []

    def run(experiment, label, precisions, base=(8, 8), **budget):
        alloc = AllocationConfig(precisions=precisions, base=base, sensitivity_samples=args.sensitivity_samples,
                                 **budget)
        # Ranges, then allocation: the integer program's own effect (the light pipeline adds BN
        # and bias tuning after it: --after bn_tuning,bias_tuning).
        after = tuple(s for s in args.after.split(",") if s)
        config = QuantConfig(steps=("ranges", "allocate", *after), samples=args.samples, allocation=alloc, cache_dir=cache_dir)
        start = time.perf_counter()
        report = quantize(model, calib, config, eval_images=evals, float_logits=float_logits).report
        seconds = time.perf_counter() - start
        a, m = report["allocate"], report["metrics"]["quantized"]
        row = {"experiment": experiment, "model": label, "size_ratio": report["size"]["ratio"],
               "bops_ratio": a["costs"]["bops"]["ratio"], "metrics": m, "seconds": seconds,
               "allocate_seconds": a["seconds"], "predicted_degradation": a["predicted_degradation"],
               "measured_degradation": a["measured_degradation"], "choice": a["choice"], "budgets": a["budgets"]}
        rows.append(row)
        print(f"{experiment:<12} {label:<22} {row['size_ratio']:10.4f} {row['bops_ratio']:10.4f} "
              f"{m['top1_agreement_confident']:9.3f} {m['top1_agreement']:6.3f} {m['kl']:7.3f} "
              f"{row['predicted_degradation']:8.4f} {row['measured_degradation']:8.4f} {seconds:8.1f}", flush=True)
        write_json_result(args.json, {"model": args.model, "n_calib": len(calib), "n_eval": len(evals),
                               "versions": versions(), "rows": rows})
        return row

    def uniform(experiment, p):  # every allocated layer at p: p is the only candidate and the base
        return run(experiment, f"uniform {precision_label(p)}", (p,), base=p, size_ratio=1.0)

    size_p = tuple(parse_precision(p) for p in args.size_precisions.split(","))
    bops_p = tuple(parse_precision(p) for p in args.bops_precisions.split(","))
    size_w4a8, _ = uniform_costs(model, calib[:1], (4, 8))
    _, bops_w4a4 = uniform_costs(model, calib[:1], (4, 4))

    if args.uniform_only:
        for p in dict.fromkeys(size_p + bops_p):
            uniform("uniform", p)
        return 0
    def size_experiment():  # milp, greedy and uniform W4A8 at the size of uniform W4A8
        first = run("size", "milp (cold cache)", size_p, size_ratio=size_w4a8)
        run("size", "greedy", size_p, size_ratio=size_w4a8, solver="greedy")
        uniform("size", (4, 8))
        return first

    def bops_experiment():  # milp, greedy and uniform W4A4 at the BOPs of uniform W4A4
        run("bops", "milp", bops_p, bops_ratio=bops_w4a4)
        run("bops", "greedy", bops_p, bops_ratio=bops_w4a4, solver="greedy")
        uniform("bops", (4, 4))

    if args.size_only:
        size_experiment()
        return 0
    if args.bops_only:
        bops_experiment()
        return 0
    first = size_experiment()
    second = run("size", "milp 0.9x budget", size_p, size_ratio=0.9 * size_w4a8)
    bops_experiment()
    solve = second["allocate_seconds"]
    first_total = first["allocate_seconds"]
    print(f"second solve (cached): allocate step {sum(solve.values()):.1f} s vs first {sum(first_total.values()):.1f} s "
          f"({100 * sum(solve.values()) / sum(first_total.values()):.1f}%)", flush=True)
    for ratio in (float(r) for r in args.pareto.split(",") if r.strip()):
        try:
            run("pareto", f"size <= {ratio:g}", size_p, size_ratio=ratio)
        except Exception as exc:  # an infeasible budget is a row, not the end of the sweep
            print(f"{'pareto':<12} size <= {ratio:g}: {exc}", flush=True)
    for p in size_p:
        uniform("pareto", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
