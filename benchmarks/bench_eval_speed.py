"""The cost of evaluating a fake-quantized model against the float model's forward, side by side.

    python benchmarks/bench_eval_speed.py [--model zoo:mobilenet_v2] [--photos DIR] [--bits W8A8,W4A4]
        [--repeats 3]

The float model, the BN-folded model with every quantizer bypassed, and the fake-quantized model
(RTN) predict the same evaluation photos (default: the demo crops) in the same process; the best
of `--repeats` timings of each. The fake-quantized model runs twice: as sub8 evaluates it (each
layer's quantized weight computed once and reused while nothing changes) and with the weights
quantized again in every forward pass (what sub8 did before; a hook clears the reuse).
Writes benchmarks/results/eval_speed.json.
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
from sub8.evaluate import predict  # noqa: E402
from sub8.quant.layers import float_mode, quant_layers  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def requantizing_weights(module):
    """Hooks that make every layer quantize its weight again in each forward (the old way)."""
    def forget(layer, args):
        layer._weight_cache = None
    return [layer.register_forward_pre_hook(forget) for layer in quant_layers(module).values()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--photos", default=None, help="a folder with calib/ and eval/ (default: the demo crops)")
    ap.add_argument("--bits", default="W8A8,W4A4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.photos:
        calib_dir, eval_dir = os.path.join(args.photos, "calib"), os.path.join(args.photos, "eval")
    else:
        calib_dir, eval_dir = build_demo_set(os.path.join("data", "demo-photos"))
    loaded = load_model(args.model)
    calib = load_images(calib_dir, loaded.transform, role="calibration").images
    evals = load_images(eval_dir, loaded.transform, role="evaluation").images
    torch.set_grad_enabled(False)
    float_seconds = best_of(lambda: predict(loaded.module, evals, args.batch), args.repeats)
    print(f"{args.model}: {len(evals)} photos, batch {args.batch}, {torch.get_num_threads()} threads; "
          f"float forward {float_seconds:.2f} s")
    rows = []
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits[1:].split("A"))
        q = quantize(loaded.module, calib, QuantConfig(w_bits=w, a_bits=a, steps=("ranges",), cache_dir=None))
        quant_seconds = best_of(lambda: predict(q.module, evals, args.batch), args.repeats)
        hooks = requantizing_weights(q.module)
        requant_seconds = best_of(lambda: predict(q.module, evals, args.batch), args.repeats)
        for hook in hooks:
            hook.remove()
        with float_mode(q.module):
            folded_seconds = best_of(lambda: predict(q.module, evals, args.batch), args.repeats)
        rows.append({"bits": bits, "fake_quant_seconds": quant_seconds, "folded_float_seconds": folded_seconds,
                     "weights_requantized_seconds": requant_seconds,
                     "fake_quant_over_float": quant_seconds / float_seconds,
                     "weights_requantized_over_float": requant_seconds / float_seconds})
        print(f"{bits}: fake-quantized {quant_seconds:.2f} s ({quant_seconds / float_seconds:.2f}x float), "
              f"weights quantized in every forward {requant_seconds:.2f} s "
              f"({requant_seconds / float_seconds:.2f}x), BN-folded with quantizers bypassed "
              f"{folded_seconds:.2f} s", flush=True)
    path = write_result("eval_speed", {"args": vars(args), "n_eval": len(evals), "float_seconds": float_seconds,
                                       "threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
