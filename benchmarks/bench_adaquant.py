"""AdaQuant cost: the whole AdaQuant step's seconds, the optimization loops' cost per iteration
summed over all layers, and peak host (and GPU) memory; grouped (all layers of a cache group in
one loop) vs one layer at a time, in one run.

    python benchmarks/bench_adaquant.py --photos data/bench-photos [--model zoo:mobilenet_v2] \
        [--samples 128] [--iters 5] [--schedules plain,grouped,one] [--device cpu|cuda] \
        [--adaquant-loss fisher|mse]

`plain` is the baseline: the loop in the shape of the paper's reference code, written here in
plain PyTorch (not that code): one layer at a time, op-by-op fake quantization under autograd,
`cache[randperm]` mini-batches, four Adam optimizers per layer, the loss read back every
iteration; the same caches, layers and iterations. The ratios are against the first schedule.

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
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, calibrate_ranges, prepare  # noqa: E402
from sub8.calibrate import AdaQuantConfig, adaquant  # noqa: E402
from sub8.config import ADAQUANT_LOSSES  # noqa: E402
adaquant_module = importlib.import_module("sub8.calibrate.adaquant")  # the name `adaquant` is the function
from sub8.data import load_images  # noqa: E402
from sub8.quant.layers import quant_layers  # noqa: E402
from sub8.report import StepLog, versions  # noqa: E402
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


def fake_quant_autograd(x, step, zero, qmin: int, qmax: int):
    """Fake quantization op by op, straight-through rounding by the detach trick."""
    zero = zero + (zero.round() - zero).detach()
    scaled = x / step
    codes = torch.clamp(scaled + (scaled.round() - scaled).detach() + zero, qmin, qmax)
    return (codes - zero) * step


def plain_layer_loop(layer, x_cache, y_cache, act, cfg: AdaQuantConfig) -> None:
    """One layer's AdaQuant loop as the reference code shapes it (see the module docstring)."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    weight = layer.layer.weight.detach().clone().requires_grad_()
    bias = layer.layer.bias.detach().clone().requires_grad_()
    channel = (-1, *[1] * (weight.dim() - 1))
    w_step, w_zero = (t.detach().clone().view(channel).requires_grad_() for t in (wq.step, wq.zero_point))
    x_step, x_zero = (t.detach().clone().requires_grad_() for t in (iq.step, iq.zero_point))
    # the reference's rates (absolute; sub8's are relative to the grid step)
    optimizers = [torch.optim.Adam([weight], lr=1e-5), torch.optim.Adam([bias], lr=1e-3),
                  torch.optim.Adam([x_step, x_zero], lr=1e-1), torch.optim.Adam([w_step, w_zero], lr=1e-3)]
    losses = []
    for _ in range(cfg.iters):
        idx = torch.randperm(len(x_cache), device=x_cache.device)[:cfg.batch_size]
        x, y = x_cache[idx], y_cache[idx]
        out = layer.apply(fake_quant_autograd(x, x_step, x_zero, iq.qmin, iq.qmax),
                          fake_quant_autograd(weight, w_step, w_zero, wq.qmin, wq.qmax), bias)
        loss = F.mse_loss(act(out), y)
        losses.append(loss.item())  # read back every iteration, as the reference does (a GPU sync)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()


def plain_loops(p, calib: torch.Tensor, cfg: AdaQuantConfig, forward_batch: int = 32) -> tuple[int, float]:
    """The baseline over every layer, on sub8's caches (float inputs, graph-chosen activation;
    contiguous, as the reference caches them). Returns (cache groups, seconds in the loops)."""
    aq = adaquant_module
    layers, float_layers = p.quant_layers(), quant_layers(p.reference)
    followed = {i.name: i.followed_by for i in p.layers}
    names = [i.name for i in p.layers if layers[i.name].weight_quantizer.enabled]
    cost = {k: v * len(calib) for k, v in aq.per_sample_bytes(p, calib, 4).items()}
    groups = aq.plan_groups(names, cost, int(cfg.max_memory_gb * 2 ** 30))
    seconds = 0.0
    for group in groups:
        xs = aq.capture_inputs(p.reference, group, calib, forward_batch, torch.float32, float_model=True)
        for k in group:
            act = aq.ACTIVATIONS[followed[k]]
            x = xs.pop(k).contiguous()
            y = aq.float_target(float_layers[k], x, act, forward_batch)
            if calib.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            plain_layer_loop(layers[k], x, y, act, cfg)
            seconds += time.perf_counter() - start
    return len(groups), seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--max-memory", type=float, default=4.0, help="GB bound on the activation cache")
    ap.add_argument("--schedules", default="plain,grouped,one")
    ap.add_argument("--adaquant-loss", choices=ADAQUANT_LOSSES, default=AdaQuantConfig.loss,
                    help="sub8's loss in the grouped/one schedules (plain: always the plain MSE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adaquant_speed.json"))
    args = ap.parse_args(argv)
    unknown = set(args.schedules.split(",")) - {"plain", "grouped", "one"}
    if unknown:
        ap.error(f"unknown schedules {sorted(unknown)}: use plain, grouped, one")

    loaded = load_model(args.model, architecture_only=True)
    calib = load_samples(args.photos, loaded.transform, args.samples).to(args.device)
    w, a = (int(v) for v in args.bits.upper().lstrip("W").split("A"))
    print(f"{args.model}, {len(calib)} calibration images, {args.bits}, {args.iters} iterations, "
          f"mini-batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"sub8's loss {args.adaquant_loss}")
    print(f"{'schedule':<16} {'groups':>6} {'step s':>8} {'loop s/iter (all layers)':>24} {'RSS MB':>8} "
          f"{'CUDA MB':>8}")
    rows = []
    for schedule in args.schedules.split(","):
        p = prepare(loaded.module, calib[:1], QuantConfig(w_bits=w, a_bits=a, device=args.device))
        calibrate_ranges(p, calib, "minmax")
        cfg = AdaQuantConfig(mode="parallel", iters=args.iters, batch_size=args.batch_size, max_memory_gb=args.max_memory,
                             loss=args.adaquant_loss)
        log = StepLog()
        if schedule == "plain":
            with log.step("adaquant", args.device):
                groups, loops = plain_loops(p, calib, cfg)
            rec = {"groups": groups, "optimize_seconds": loops, "peak_cache_mb": None}
        else:
            with log.step("adaquant", args.device), one_layer_per_group(schedule == "one"):
                rec = adaquant(p, calib, cfg, show_progress=False)
        step = log.steps[0]
        row = {"schedule": schedule, "groups": rec["groups"], "seconds": step["seconds"],
               "optimize_seconds": rec["optimize_seconds"], "seconds_per_iter": rec["optimize_seconds"] / args.iters,
               "peak_rss_mb": step["peak_rss_mb"], "peak_cuda_mb": step.get("peak_cuda_mb"),
               "peak_cache_mb": rec["peak_cache_mb"]}
        rows.append(row)
        print(f"{schedule:<16} {rec['groups']:>6} {row['seconds']:8.1f} {row['seconds_per_iter']:24.3f} "
              f"{row['peak_rss_mb']:8.0f} {row['peak_cuda_mb'] or 0:8.0f}", flush=True)
    for row in rows[1:]:
        print(f"per-iteration time {rows[0]['schedule']} / {row['schedule']}: "
              f"{rows[0]['seconds_per_iter'] / row['seconds_per_iter']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json_result(args.json, {"model": args.model, "n_calib": len(calib), "iters": args.iters,
                           "batch_size": args.batch_size, "bits": args.bits, "device": args.device,
                           "adaquant_loss": args.adaquant_loss,
                           "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
