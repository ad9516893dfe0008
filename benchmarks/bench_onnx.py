"""ONNX Runtime inference of the exported MobileNetV2: float ONNX vs W8A8 QDQ, side by side.

    python benchmarks/bench_onnx.py [--photos data/bench-photos] [--json out.json]

Quantizes MobileNetV2 at W8A8 with sub8's defaults (symmetric weights, requantized residual adds
and pool input, ranges, channel equalization folded into the producing convolutions, and bias
correction on --samples calibration images), exports it with
sub8's QDQ exporter (int8 weights, the default, and uint8), and the float model with the same
exporter (no quantizers); beside them the default without channel equalization, the export
before requantized junctions (uint8 weights, an earlier default) and asymmetric weights. Times ONNX Runtime (CPU provider, default threads)
at batch 1 and 32: median latency over --repeats runs after warm-up, and throughput. The runs
interleave (each model in turn, then again) so that machine noise hits all alike. Also
prints the top-1 agreement of each QDQ model with sub8's own model on the evaluation images.
Writes the rows as JSON (default benchmarks/results/onnx.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.data.demo import build_demo_set  # noqa: E402
from sub8.export.onnx_qdq import to_onnx  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

# label: (QuantConfig settings, the exporter's 8-bit weight type)
MODELS = {"float": (dict(w_bits="float", a_bits="float", first_last_bits="float"), "int8"),
          "W8A8 default": ({}, "int8"),
          "W8A8 default, uint8 weights": ({}, "uint8"),
          "W8A8 default without channel equalization": (dict(steps=("ranges", "bias_correction")), "int8"),
          "W8A8 no requantize, uint8 (before)": (dict(requantize=False), "uint8"),
          "W8A8 asymmetric weights": (dict(w_symmetric=False), "int8")}


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=None, help="folder of images (default: the embedded demo photos)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "onnx.json"))
    args = ap.parse_args(argv)

    loaded = load_model("zoo:mobilenet_v2")
    if args.photos is None:
        calib_dir, eval_dir = build_demo_set(os.path.join(os.path.expanduser("~"), ".cache", "sub8", "demo"))
    else:
        calib_dir = eval_dir = args.photos
    calib = load_images(calib_dir, loaded.transform, limit=args.samples, seed=0).images
    evals = load_images(eval_dir, loaded.transform, limit=64, seed=1).images
    if len(evals) < 32:
        raise SystemExit("need at least 32 evaluation images")

    sessions, agreement, quantized = {}, {}, {}
    for label, (settings, weights) in MODELS.items():
        key = repr(sorted(settings.items()))
        if key not in quantized:
            quantized[key] = quantize(loaded.module, calib, QuantConfig(cache_dir=None, **settings))
        qm = quantized[key]
        session = ort.InferenceSession(to_onnx(qm.module, (1, 3, 224, 224), weights)[0].SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        sessions[label] = session
        with torch.no_grad():
            ref = qm(evals).numpy()
        out = session.run(None, {"x": evals.numpy()})[0]
        agreement[label] = float((out.argmax(1) == ref.argmax(1)).mean())

    times = {(label, bs): [] for label in sessions for bs in (1, 32)}
    for bs in (1, 32):
        x = {"x": evals[:bs].numpy()}
        for session in sessions.values():
            for _ in range(3):
                session.run(None, x)
        for _ in range(args.repeats):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, x)
                times[(label, bs)].append(time.perf_counter() - start)

    rows = []
    print(f"ONNX Runtime {ort.__version__}, CPU {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores, {' '.join(cpu_flags()) or 'no SIMD flags read'})")
    print(f"{'model':36s} {'batch':>5s} {'median ms':>10s} {'img/s':>8s} {'vs float':>9s} {'agree w/ sub8':>14s}")
    for bs in (1, 32):
        base = float(np.median(times[("float", bs)]))
        for label in sessions:
            ms = float(np.median(times[(label, bs)])) * 1000
            row = {"model": label, "batch": bs, "median_ms": ms, "images_per_s": bs / ms * 1000,
                   "speedup_vs_float": base * 1000 / ms,
                   "top1_agreement_with_sub8": None if label == "float" else agreement[label]}
            rows.append(row)
            agree = "" if label == "float" else f"{agreement[label]:.3f}"
            print(f"{label:36s} {bs:5d} {ms:10.2f} {row['images_per_s']:8.1f} {row['speedup_vs_float']:8.2f}x {agree:>14s}")
    write_json_result(args.json, {"benchmark": "onnx", "versions": versions(), "onnxruntime": ort.__version__,
                           "cpu_flags": cpu_flags(), "repeats": args.repeats, "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
