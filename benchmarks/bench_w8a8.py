"""Why a W8A8 recipe keeps or loses the float model's decisions: the default's parts, one at a
time, next to NNCF's default, on the same photos, in one run.

    python benchmarks/bench_w8a8.py [--models zoo:mobilenet_v2,zoo:efficientnet_lite0]
        [--photos data/bench-photos] [--samples 256] [--no-nncf]

Each row is the default W8A8 run with one choice changed (the range method of weights and
activations, requantized junctions, bias correction), or the default model with one group of
its quantizers passing their inputs through (where the loss sits), measured against the float
model on every evaluation photo: top-1 agreement on all and on the confident ones (float top
probability at least 0.5), mean KL(float || quantized), and two figures that tell a systematic
error from a random one on the confident photos: the mean change of the float top class's logit,
and the mean and spread of the change of its margin over the runner-up. A negative mean shrinks
the decisions the model was sure of, which flips confident photos even when the spread (and KL)
is as small as another tool's. Writes benchmarks/results/w8a8.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_peers import run_nncf, same_inputs  # noqa: E402  (the peers' inputs and NNCF's settings)
from results_io import write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.evaluate import CONFIDENT, compare, predict  # noqa: E402
from sub8.quant.layers import float_mode  # noqa: E402

# (label, QuantConfig settings over the default W8A8 run)
VARIANTS = (
    ("default: min-max weights, percentile activations, bias correction", {}),
    ("percentile weights and activations (the default before)", {"ranges": "percentile"}),
    ("min-max weights and activations", {"ranges": "minmax"}),
    ("MSE-optimal weights and activations", {"ranges": "mse"}),
    ("default, no bias correction (rtn)", {"pipeline": "rtn"}),
    ("default, --no-requantize", {"requantize": False}),
)

# (label, which of the default model's quantizers pass their input through): where the loss sits.
# Bias correction stays as the default run set it (for its quantized weights).
BYPASSED = (
    ("default, only weights quantized", lambda name: not name.endswith("weight_quantizer")),
    ("default, weights and junctions quantized (layer inputs float)",
     lambda name: name.endswith("input_quantizer") and not name.startswith("requant_")),
    ("default, junctions float", lambda name: name.startswith("requant_")),
)



def decision_shift(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> dict:
    """On the confident photos: the float top class's logit change, and its margin change."""
    top = float_logits.argmax(1)
    confident = float_logits.softmax(1).amax(1) >= CONFIDENT
    rows = torch.arange(len(top))

    def margin(logits):
        others = logits.clone()
        others[rows, top] = float("-inf")
        return logits[rows, top] - others.amax(1)

    change = (margin(quant_logits) - margin(float_logits))[confident]
    return {"top_logit_change": (quant_logits[rows, top] - float_logits[rows, top])[confident].mean().item(),
            "margin_change": change.mean().item(), "margin_change_sd": change.std().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="zoo:mobilenet_v2,zoo:efficientnet_lite0")
    ap.add_argument("--photos", default=os.path.join("data", "bench-photos"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--no-nncf", action="store_true", help="skip the NNCF row (its extra is not installed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = []
    print(f"{'model':20s} {'recipe':66s} {'conf':>6s} {'top1':>6s} {'KL':>7s} {'top':>6s} {'margin':>13s} {'s':>5s}")
    for spec in args.models.split(","):
        loaded, calib, evals, float_logits = same_inputs(spec, args.photos, args.samples, args.seed)
        runs = [(label, lambda s=settings: quantize(loaded.module, calib, QuantConfig(
            w_bits=8, a_bits=8, cache_dir=None, seed=args.seed, **s)).module) for label, settings in VARIANTS]
        if not args.no_nncf:
            runs.append(("NNCF nncf.quantize default preset", lambda: run_nncf(loaded.module, calib, 8, 8)))

        def measured(label, quant_logits, seconds):
            row = {"model": spec, "recipe": label, "seconds": seconds, "n_calib": len(calib),
                   "metrics": compare(float_logits, quant_logits), **decision_shift(float_logits, quant_logits)}
            rows.append(row)
            m = row["metrics"]
            print(f"{spec:20s} {label:66s} {m['top1_agreement_confident']:6.3f} {m['top1_agreement']:6.3f} "
                  f"{m['kl']:7.4f} {row['top_logit_change']:+6.3f} {row['margin_change']:+6.3f}±{row['margin_change_sd']:.3f} "
                  f"{'-' if seconds is None else format(seconds, '.1f'):>5s}", flush=True)

        default = None
        for label, run in runs:
            start = time.perf_counter()
            qmodel = run()
            seconds = time.perf_counter() - start
            measured(label, predict(qmodel, evals), seconds)
            default = qmodel if default is None else default  # VARIANTS[0]'s
        for label, which in BYPASSED:  # (no time: the default model, evaluated again)
            with float_mode(default, which):
                measured(label, predict(default, evals), None)
    print(f"wrote {write_result('w8a8', {'args': vars(args), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
