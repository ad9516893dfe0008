"""AdaQuant vs round-to-nearest on a zoo model: agreement with the float model on the benchmark
photo set, per bit width and AdaQuant mode, with the time of each run.

    python benchmarks/bench_adaquant_quality.py --photos data/bench-photos \
        [--bits W4A8,W4A4] [--methods rtn,parallel,sequential,parallel+bias_correction] \
        [--iters 1000] [--batch-size 50] [--lr-weight 1e-3] [--lr-input-quant 1e-2] \
        [--adaquant-loss mse|fisher] [--fisher-draws 1] \
        [--samples 256] [--device cpu|cuda] [--bias-tune-ranges none|last|all] [--bias-iters 200]

The faster CPU setting (the README's): --methods sequential --iters 100 --batch-size 16
--lr-weight 1e-2 --lr-input-quant 1e-1. First and last layers stay at 8 bits. Prints a table; writes JSON
(default benchmarks/results/adaquant_quality.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.calibrate import AdaQuantConfig  # noqa: E402
from sub8.calibrate.adaquant import BUDGETS  # noqa: E402
from sub8.config import ADAQUANT_LOSSES, INPUT_RANGES, BiasTuningConfig  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import predict  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--bits", default="W8A8,W4A8,W4A4")
    ap.add_argument("--methods", default="rtn,parallel,sequential",
                    help="rtn, or an AdaQuant mode with optional later steps: parallel+bias_correction")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="hold-out split, mini-batches, Fisher draws")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr-weight", type=float, default=BUDGETS["full"]["lr_weight"],
                    help="relative (grid steps); 1e-2 at 100 iterations moves weights as far as 1e-3 at 1000")
    ap.add_argument("--lr-input-quant", type=float, default=BUDGETS["full"]["lr_input_quant"],
                    help="relative rate of the input steps in AdaQuant (0: leave them to a later step)")
    ap.add_argument("--adaquant-loss", choices=ADAQUANT_LOSSES, default=AdaQuantConfig.loss)
    ap.add_argument("--fisher-draws", type=int, default=AdaQuantConfig.fisher_draws)
    ap.add_argument("--max-memory", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bias-tune-ranges", choices=INPUT_RANGES, default="none",
                    help="input steps that a +bias_tuning method also trains")
    ap.add_argument("--bias-iters", type=int, default=BiasTuningConfig.iters, help="bias tuning iterations")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adaquant_quality.json"))
    args = ap.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples).images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform).images
    model = loaded.module.eval()
    float_logits = predict(model.to(args.device), evals, 64, args.device)
    print(f"{args.model}: {len(calib)} calibration / {len(evals)} evaluation images, device {args.device}, "
          f"AdaQuant {args.iters} iterations, mini-batch {args.batch_size}, lr-weight {args.lr_weight:g}, "
          f"lr-input-quant {args.lr_input_quant:g}, loss {args.adaquant_loss} "
          f"({args.fisher_draws} draws), seed {args.seed}, "
          f"bias tuning: {args.bias_iters} iterations, trains input ranges: {args.bias_tune_ranges}", flush=True)
    print(f"{'bits':<6} {'method':<24} {'conf top1':>9} {'top1':>6} {'KL':>7} {'seconds':>8} "
          f"{'RSS MB':>7} {'CUDA MB':>7} {'MSE after/before':>16}", flush=True)
    rows = []
    for bits in args.bits.split(","):
        w, a = parse_bits(bits)
        for method in args.methods.split(","):
            mode, *extra = method.split("+")
            steps = ("ranges", *extra) if mode == "rtn" else ("ranges", "adaquant", *extra)
            label = method if mode == "rtn" else f"adaquant {method}"
            config = QuantConfig(w_bits=w, a_bits=a, steps=steps, samples=args.samples, device=args.device,
                                 seed=args.seed,
                                 adaquant=AdaQuantConfig(mode=mode if mode != "rtn" else "parallel", reconstruct="layer",
                                                         iters=args.iters,
                                                         batch_size=args.batch_size,
                                                         lr_weight=args.lr_weight,
                                                         lr_input_quant=args.lr_input_quant,
                                                         loss=args.adaquant_loss,
                                                         fisher_draws=args.fisher_draws,
                                                         max_memory_gb=args.max_memory),
                                 bias_tuning=BiasTuningConfig(iters=args.bias_iters,
                                                              input_ranges=args.bias_tune_ranges))
            start = time.perf_counter()
            result = quantize(model, calib, config, eval_images=evals, float_logits=float_logits)
            seconds = time.perf_counter() - start
            report = result.report
            metrics = report["metrics"]["quantized"]
            step_log = {s["name"]: s for s in report["steps"]}
            ratio = ""
            if "adaquant" in report:
                layers = report["adaquant"]["layers"]
                r = sorted(x["heldout_mse_after"] / max(x["heldout_mse_before"], 1e-30) for x in layers)
                ratio = f"{r[len(r) // 2]:.2f}"
            peak = max(s.get("peak_rss_mb") or 0 for s in report["steps"])
            peak_cuda = max(s.get("peak_cuda_mb") or 0 for s in report["steps"])
            row = {"bits": bits, "method": label, "seconds": seconds,
                   "adaquant_seconds": step_log.get("adaquant", {}).get("seconds"),
                   "median_mse_ratio": ratio, "metrics": metrics, "steps": report["steps"],
                   "adaquant": report.get("adaquant"), "bias_tuning": report.get("bias_tuning")}
            rows.append(row)
            print(f"{bits:<6} {label:<24} {metrics['top1_agreement_confident']:9.3f} "
                  f"{metrics['top1_agreement']:6.3f} {metrics['kl']:7.3f} {seconds:8.1f} {peak:7.0f} {peak_cuda:7.0f} "
                  f"{ratio:>16}", flush=True)
            model = model.to(args.device)
            write_json_result(args.json, {"model": args.model, "n_calib": len(calib), "n_eval": len(evals),
                                   "iters": args.iters, "batch_size": args.batch_size, "lr_weight": args.lr_weight,
                                   "lr_input_quant": args.lr_input_quant,
                                   "adaquant_loss": args.adaquant_loss, "fisher_draws": args.fisher_draws,
                                   "bias_tune_ranges": args.bias_tune_ranges, "bias_iters": args.bias_iters,
                                   "device": args.device, "seed": args.seed,
                                   "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
