"""Layer-wise AdaQuant against block reconstruction, learned rounding and QDrop: agreement with
the float model on the benchmark photos, time, per width and seed; or (--memory) the whole
process's peak RSS of each on torchvision ResNet-50 with random weights.

    python benchmarks/bench_reconstruct.py [--bits W4A4,W2A4,W4A8] [--seeds 0,1,2] \
        [--configs layer,block,block+learned,block+qdrop,block+learned+qdrop] [--iters 100[,400]]
    python benchmarks/bench_reconstruct.py --memory [--samples 512] [--max-memory 4] [--update]

A config is `layer` or `block`, with `+learned` (AdaRound's rounding), `+qdrop` (p = 0.5), `+mse`
(plain MSE instead of the Fisher-weighted loss), `+equalize` or `+gptq` (that step between the
ranges and the reconstruction, as its starting point);
`mixed+CONFIG` allocates W8A8/W4A8/W4A4/W2A4 per layer by integer programming at the BOPs of the
uniform width (parallel AdaQuant candidates, sensitivities on --sensitivity-samples photos), then
fits the mix with CONFIG.
All at the CPU setting (sequential, mini-batch 16, relative rates 1e-2 for the weights and 1e-1
for the input steps); first and last layers at 8 bits. Prints a table (mean and spread over the
seeds); writes benchmarks/results/reconstruct.json (--memory: reconstruct_memory.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import commit, kept_rows, write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.demo import CPU_ADAQUANT  # noqa: E402

METRICS = ("top1_agreement_confident", "top1_agreement", "kl")


# A step that runs between the ranges and the reconstruction: its weights or inputs are the
# reconstruction's starting point.
BEFORE = ("equalize", "gptq")


def settings(config: str, iters: int) -> dict:
    unit, *extras = config.removeprefix("mixed+").split("+")
    unknown = set(extras) - {"learned", "qdrop", "mse", *BEFORE}
    if unit not in ("layer", "block") or unknown:
        raise SystemExit(f"unknown config {config!r}: layer|block, then any of +learned, +qdrop, +mse, "
                         f"{', '.join('+' + b for b in BEFORE)}")
    return {**CPU_ADAQUANT, "iters": iters, "reconstruct": unit, **({"loss": "mse"} if "mse" in extras else {}),
            "rounding": "learned" if "learned" in extras else "free", "qdrop": 0.5 if "qdrop" in extras else 0.0}


def steps(config: str) -> tuple[str, ...] | None:
    """The step list of a config with a step before the reconstruction, else None (the pipeline's)."""
    before = [b for b in BEFORE if b in config.split("+")]
    return ("ranges", *before, "adaquant") if before else None


def quality(args) -> int:
    from sub8.data import load_images
    from sub8.evaluate import compare, predict
    from sub8.zoo import load_model

    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, limit=args.samples,
                        role="calibration").images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform, role="evaluation").images
    model = loaded.module.eval().to(args.device)
    float_logits = predict(model, evals, 64, args.device)
    print(f"{args.model}: {len(calib)} calibration / {len(evals)} evaluation photos; {args.iters} iterations "
          f"per unit; seeds {args.seeds}", flush=True)
    print(f"{'bits':<6} {'config':<22} {'iters':>5} {'seed':>4} {'conf top1':>9} {'top1':>6} {'KL':>7} {'minutes':>7}",
          flush=True)
    rows = []
    for bits, config, iters, seed in itertools.product(args.bits.split(","), args.configs.split(","),
                                                       [int(i) for i in args.iters.split(",")],
                                                       [int(s) for s in args.seeds.split(",")]):
        w, a = (int(v) for v in bits.upper().lstrip("W").split("A"))
        own_steps = steps(config)
        if own_steps and config.startswith("mixed+"):
            raise SystemExit(f"{config}: mixed+ runs its own steps")
        qc = QuantConfig(w_bits=w, a_bits=a, pipeline="adaquant", cache_dir=None, seed=seed,
                         device=args.device, adaquant=settings(config, iters), steps=own_steps)
        if config.startswith("mixed+"):
            qc = mixed(qc, model, calib, args.sensitivity_samples)
        start = time.perf_counter()
        result = quantize(model, calib, qc)
        seconds = time.perf_counter() - start
        metrics = compare(float_logits, predict(result.module, evals, 64, args.device))
        rows.append({"bits": bits, "config": config, "iters": iters, "seed": seed, "seconds": seconds,
                     "metrics": {k: metrics[k] for k in (*METRICS, "n_confident")},
                     "adaquant": result.report.get("adaquant"), "allocate": result.report.get("allocate")})
        print(f"{bits:<6} {config:<22} {iters:>5} {seed:>4} {metrics['top1_agreement_confident']:9.3f} "
              f"{metrics['top1_agreement']:6.3f} {metrics['kl']:7.3f} {seconds / 60:7.1f}", flush=True)
        write_result(args.name, {"model": args.model, "device": args.device, "n_calib": len(calib), "n_eval": len(evals),
                                     "iters": args.iters, "rows": rows, "summary": summary(rows)}, args.json)
    print("\nmean (spread) over seeds")
    for s in summary(rows):
        print(f"{s['bits']:<6} {s['config']:<22} {s['iters']:>5} conf {s['conf_mean']:.3f} ({s['conf_min']:.3f}-{s['conf_max']:.3f}) "
              f"KL {s['kl_mean']:.3f} minutes {s['minutes_mean']:.1f}")
    return 0


def mixed(uniform: QuantConfig, model, calib, sensitivity_samples: int) -> QuantConfig:
    """The allocation run at the uniform config's BOPs (first and last layers as there)."""
    from dataclasses import replace

    from sub8 import prepare
    from sub8.allocate.costs import bops

    layers = prepare(model, calib[:1], uniform).layers
    ratio = sum(bops(i.macs, (i.w_bits, i.a_bits)) for i in layers) / sum(bops(i.macs, (None, None)) for i in layers)
    return replace(uniform, steps=("ranges", "adaquant", "allocate", "adaquant_sequential"),
                   adaquant=replace(uniform.adaquant, mode="auto"),  # (candidates: parallel)
                   allocation=replace(uniform.allocation, bops_ratio=ratio, sensitivity_samples=sensitivity_samples))


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["bits"], r["config"], r.get("iters")) for r in rows):
        group = [r for r in rows if (r["bits"], r["config"], r.get("iters")) == key]
        conf = [r["metrics"]["top1_agreement_confident"] for r in group]
        out.append({"bits": key[0], "config": key[1], "iters": key[2], "seeds": len(group), "conf_mean": statistics.mean(conf),
                    "conf_min": min(conf), "conf_max": max(conf),
                    "kl_mean": statistics.mean(r["metrics"]["kl"] for r in group),
                    "minutes_mean": statistics.mean(r["seconds"] for r in group) / 60})
    return out


def memory_child(config: str, samples: int, max_memory: float, iters: int) -> dict:
    """One run in this process: ResNet-50 (random weights), W4A4, `samples` random 224x224 images."""
    import torch
    import torchvision

    torch.manual_seed(0)
    calib = torch.randn(samples, 3, 224, 224)
    qc = QuantConfig(w_bits=4, a_bits=4, pipeline="adaquant", cache_dir=None,
                     adaquant={**settings(config, iters), "max_memory_gb": max_memory})
    start = time.perf_counter()
    report = quantize(torchvision.models.resnet50().eval(), calib, qc).report
    return {"config": config, "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cache_mb": report["adaquant"]["peak_cache_mb"], "calib_mb": calib.numel() * 4 / 2 ** 20}


def memory(args) -> int:
    rows = []
    print(f"ResNet-50, random weights, W4A4, {args.samples} images 224x224, --max-memory {args.max_memory}, "
          f"{args.iters} iterations per unit")
    print(f"{'config':<22} {'peak RSS MB':>11} {'peak cache MB':>13} {'minutes':>7}", flush=True)
    configs = args.configs.split(",")
    # (read once; a config's earlier row gives way only once this run has measured it)
    earlier = kept_rows("reconstruct_memory", set(), lambda r: r["config"]) if args.update else []
    for config in configs:
        out = subprocess.run([sys.executable, __file__, "--memory-child", config, "--samples", str(args.samples),
                              "--max-memory", str(args.max_memory), "--iters", str(args.iters)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            return out.returncode
        row = {**json.loads(out.stdout.strip().splitlines()[-1]), "commit": commit()}
        rows.append(row)
        print(f"{config:<22} {row['peak_rss_mb']:11.0f} {row['peak_cache_mb']:13.0f} {row['seconds'] / 60:7.1f}",
              flush=True)
        write_result("reconstruct_memory", {"model": "torchvision resnet50 (random weights)", "n_calib": args.samples,
                                            "max_memory_gb": args.max_memory, "iters": int(args.iters),
                                            "rows": [r for r in earlier if r["config"] not in
                                                     {x["config"] for x in rows}] + rows})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="data/bench-photos")
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--bits", default="W4A4,W2A4,W4A8")
    ap.add_argument("--configs", default="layer,block,block+learned,block+qdrop,block+learned+qdrop")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--iters", default="100", help="iterations per unit; a list runs each")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sensitivity-samples", type=int, default=64, help="mixed+: photos for the sensitivities")
    ap.add_argument("--memory", action="store_true", help="peak RSS on ResNet-50 instead of quality")
    ap.add_argument("--max-memory", type=float, default=4.0)
    ap.add_argument("--update", action="store_true", help="--memory: keep the result file's rows of the configs "
                    "this run does not measure (each row names the commit that measured it)")
    ap.add_argument("--name", default="reconstruct", help="benchmarks/results/NAME.json")
    ap.add_argument("--json", help="write here instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.samples, args.max_memory, int(args.iters))))
        return 0
    return memory(args) if args.memory else quality(args)


if __name__ == "__main__":
    sys.exit(main())
