"""One layer's input step against three measures of what it costs: the layer's own output MSE
(what plain AdaQuant minimizes), the Fisher-weighted error (`--adaquant-loss fisher`) and the
model's agreement with float, with only that input quantized (float weights, every other
tensor float).

    python benchmarks/bench_input_step.py --photos data/bench-photos \
        [--model zoo:mobilenet_v2] [--layer features.17.conv.0.0] [--a-bits 4] [--scales 1,0.5,...]

The step starts from the MSE range (`--ranges mse`) and is scaled by each factor. Prints a table;
writes JSON (default benchmarks/results/input_step.json).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.calibrate.adaquant import ACTIVATIONS, capture_inputs, float_target, reconstruction_mse  # noqa: E402
from sub8.calibrate.fisher import fisher_weights  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import compare, predict  # noqa: E402
from sub8.quant.quantizer import affine_params  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.zoo import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--layer", default="features.17.conv.0.0")
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--samples", type=int, default=256, help="calibration images (ranges)")
    ap.add_argument("--measure", type=int, default=64, help="of which the layer's errors are measured on")
    ap.add_argument("--eval", type=int, default=192, help="evaluation images")
    ap.add_argument("--fisher-draws", type=int, default=4)
    ap.add_argument("--scales", default="1,0.7,0.5,0.35,0.25,0.18,0.12,0.08,0.05")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "input_step.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples).images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform).images[:args.eval]
    model = loaded.module.eval()
    float_logits = predict(model, evals, 64)
    # only this layer's input is quantized
    q = quantize(model, calib, QuantConfig(w_bits="float", a_bits="float", first_last_bits="float",
                                           layer_bits={args.layer: ("float", args.a_bits)},
                                           steps=("ranges",), samples=args.samples, cache_dir=None))
    prepared = q.prepared
    info = {i.name: i for i in prepared.layers}[args.layer]
    act = ACTIVATIONS[info.followed_by]
    layer = prepared.quant_layers()[args.layer]
    part = calib[:args.measure]
    x = capture_inputs(prepared.reference, [args.layer], part, 32, torch.float32, float_model=True)[args.layer]
    y = float_target(layer, x, act, 32)
    w = fisher_weights(prepared.reference, [args.layer], {args.layer: info.followed_by}, part, "kl",
                       args.fisher_draws, 32, 0, torch.float32)[args.layer]
    aq = layer.input_quantizer
    step0, zero0 = aq.step.detach().clone(), aq.zero_point.detach().clone()
    lo0, hi0 = -zero0 * step0, (aq.qmax - zero0) * step0
    print(f"{args.model} {args.layer} (followed by {info.followed_by}): A{args.a_bits} input, observed "
          f"[{x.min().item():.2f}, {x.max().item():.2f}]; errors on {len(part)} calibration images, "
          f"agreement on {len(evals)} evaluation images", flush=True)
    print(f"{'scale':>6} {'step':>7} {'layer MSE':>10} {'Fisher err':>10} {'conf top1':>9} {'KL':>7}", flush=True)
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        with torch.no_grad():
            step, zero, _ = affine_params(lo0 * scale, hi0 * scale, aq.bits, aq.symmetric)
            aq.step.copy_(step)
            aq.zero_point.copy_(zero)
        m = compare(float_logits, predict(q.module, evals, 64))
        row = {"scale": scale, "step": aq.step.item(), "layer_mse": reconstruction_mse(layer, x, y, act, 32),
               "fisher_error": reconstruction_mse(layer, x, y, act, 32, w), "metrics": m}
        rows.append(row)
        print(f"{scale:6.2f} {row['step']:7.3f} {row['layer_mse']:10.5f} {row['fisher_error']:10.5f} "
              f"{m['top1_agreement_confident']:9.3f} {m['kl']:7.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json_result(args.json, {"model": args.model, "layer": args.layer, "a_bits": args.a_bits,
                           "n_measure": len(part), "n_eval": len(evals), "fisher_draws": args.fisher_draws,
                           "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
