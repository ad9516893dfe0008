"""`sub8 inspect` on a real model: its culprits, what their suggested lines do when a run is
redone with them, and what the inspection costs against evaluating the quantized model.

    python benchmarks/bench_inspect.py --photos data/bench-photos [--model zoo:mobilenet_v2]
        [--bits W8A8,W4A8] [--samples 32] [--confirm 64] [--json PATH]

Per precision, in one process: the default pipeline on the calibration photos; one evaluation
of the quantized model on every evaluation photo (timed alone); the inspection (timed), ranking
on `--samples` of them and measuring the worst again on `--confirm` others; then the run redone with the first culprit's suggested --layer-bits line, both
evaluated on every evaluation photo. Writes benchmarks/results/inspect.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.adapters import adapter_for  # noqa: E402
from sub8.analyzer import inspect, split_samples, summary  # noqa: E402
from sub8.config import parse_layer_bits  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import predict  # noqa: E402
from sub8.size import size_report  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def headline(m: dict) -> str:
    return (f"confident top-1 {m['top1_agreement_confident']:.3f}, top-1 {m['top1_agreement']:.3f}, "
            f"KL {m['kl']:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--photos", required=True, help="a folder with calib/ and eval/")
    ap.add_argument("--bits", default="W8A8,W4A8")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--confirm", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    adapter = adapter_for(loaded.module)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, role="calibration").images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform, role="evaluation").images
    float_logits = predict(loaded.module, evals)
    rows = []
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits[1:].split("A"))
        config = QuantConfig(w_bits=w, a_bits=a)
        start = time.perf_counter()
        q = quantize(loaded.module, calib, config, eval_images=evals, float_logits=float_logits, fresh=True)
        run_seconds = time.perf_counter() - start
        start = time.perf_counter()
        predict(q.module, evals)
        eval_seconds = time.perf_counter() - start
        resolved = QuantConfig.from_dict(q.report["config"])
        data, fresh = split_samples(evals, args.samples, args.confirm, resolved.seed)
        record = inspect(q.prepared, q.prepared.reference, data, resolved,
                         lambda f, o: adapter.compare(loaded.module, f, o),
                         lambda: size_report(q.prepared)["ratio"], top=args.top, fresh=fresh)
        print("\n".join(summary(record)))
        row = {"model": args.model, "bits": bits, "run_seconds": run_seconds, "metrics": q.report["metrics"]["quantized"],
               "size_ratio": q.report["size"]["ratio"], "eval_photos": len(evals), "eval_seconds": eval_seconds,
               "inspect_seconds": record["seconds"], "inspect_over_eval": record["seconds"] / eval_seconds,
               "inspect": {k: record[k] for k in ("samples", "fresh_samples", "loss", "baseline", "culprits")}}
        first = next((c for c in record["culprits"] if (c.get("suggestion") or {}).get("layer_bits")), None)
        if first is not None:
            line = first["suggestion"]["layer_bits"]
            fixed = quantize(loaded.module, calib, QuantConfig(w_bits=w, a_bits=a, layer_bits=parse_layer_bits([line])),
                             eval_images=evals, float_logits=float_logits, fresh=True)
            row["rerun_with_first_line"] = {"layer_bits": line, "metrics": fixed.report["metrics"]["quantized"],
                                            "size_ratio": fixed.report["size"]["ratio"]}
            print(f"{bits}: {headline(row['metrics'])}, size {row['size_ratio']:.4f}; rerun with "
                  f"--layer-bits '{line}': {headline(fixed.report['metrics']['quantized'])}, "
                  f"size {fixed.report['size']['ratio']:.4f}")
        print(f"{bits}: one evaluation of {len(evals)} photos {eval_seconds:.1f} s; inspection of "
              f"{record['samples']} photos {record['seconds']:.1f} s ({row['inspect_over_eval']:.2f} evaluations)")
        rows.append(row)
    path = write_result("inspect", {"benchmark": "inspect", "command": "python " + " ".join(sys.argv),
                                    "args": vars(args), "rows": rows}, args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
