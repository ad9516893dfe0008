"""Any model a user brings: sub8 on 24 torchvision and 13 timm image classifiers, random weights.

    python benchmarks/bench_zoo.py [--models all|torchvision|timm|NAME,...] [--photos data/bench-photos]
                                   [--calib 8] [--eval 8] [--iters 2] [--json out.json]

Per model: how it was captured (a torch.fx graph, or module by module), how many layers, the
share of its parameters and of its multiply-accumulates (weight-bearing operations and
attention's matrix products) quantized, and what stayed float with the reason
(sub8/prepare/coverage.py); W8A8 with the default recipe, fidelity to the float model on the
evaluation photos (top-1 agreement, KL); the ONNX export run in ONNX Runtime (top-1 agreement
with sub8's own model, or why the exporter refused it); and W4A8 AdaQuant (the default blocks
and QDrop) for a few iterations. Every stage runs even when an earlier one failed, and a failure
is recorded with its message, never hidden.

Random weights: zero-initialized layers (the classification heads of ViTs) are re-drawn from
N(0, 0.02), so that the outputs vary with the input and fidelity means something. Writes
benchmarks/results/zoo.json (timm from `pip install -e '.[timm]'`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import compare  # noqa: E402
from sub8.zoo import imagenet_transform  # noqa: E402

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
               "shufflenet_v2_x1_0", "squeezenet1_0", "densenet121", "googlenet", "inception_v3", "mnasnet0_5",
               "alexnet", "vgg11_bn", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"]
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "vit_tiny_patch16_224",
        "deit_tiny_patch16_224", "regnety_002", "ghostnet_100", "levit_128s", "mobilevit_xxs", "edgenext_xx_small",
        "repvgg_a0", "fastvit_t8"]
# Vision transformers: their attention products must all be quantized.
TRANSFORMERS = {"torchvision:vit_b_16", "torchvision:swin_t", "torchvision:swin_v2_t", "torchvision:maxvit_t",
                "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224", "timm:levit_128s", "timm:mobilevit_xxs",
                "timm:edgenext_xx_small"}


def build(spec: str) -> tuple[nn.Module, int]:
    """The architecture with random weights (seed 0), and its input size."""
    torch.manual_seed(0)
    kind, name = spec.split(":", 1)
    if kind == "torchvision":
        import torchvision
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        size = 299 if name == "inception_v3" else 224
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
        size = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    return model.eval(), size


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]


def run_one(spec: str, calib: torch.Tensor, evals: torch.Tensor, iters: int) -> dict:
    """Every stage of one model; a stage that fails records its error and the next still runs."""
    row: dict = {"model": spec}
    start = time.perf_counter()
    try:
        model, size = build(spec)
        row["params"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:  # the architecture itself
        return {**row, "error": {"build": _error(exc)}}
    errors = row["error"] = {}
    calib, evals = calib[size], evals[size]
    with torch.no_grad():
        float_logits = model(evals)
    q8 = None
    try:
        t = time.perf_counter()
        q8 = quantize(model, calib, QuantConfig(cache_dir=None), eval_images=evals, float_logits=float_logits)
        report = q8.report
        coverage = report["coverage"]
        m = report["metrics"]["quantized"]
        row.update(capture=report["capture"]["path"], capture_reason=report["capture"]["reason"],
                   layers=len(report["layers"]), params_quantized=coverage["params"]["share"],
                   macs_quantized=coverage["macs"]["share"], products=coverage["products"],
                   float_ops=[{k: e[k] for k in ("where", "op", "weights", "macs_share", "params_share", "reason")}
                              for e in coverage["float"]],
                   w8a8={"top1_agreement": m["top1_agreement"], "kl": m["kl"],
                         "seconds": time.perf_counter() - t})
    except Exception as exc:
        errors["w8a8"] = _error(exc)
        traceback.print_exc(limit=-2)
    if q8 is not None:
        try:
            row["onnx"] = onnx_check(q8, evals, size)
        except Exception as exc:
            errors["onnx"] = _error(exc)
    try:
        t = time.perf_counter()
        q4 = quantize(model, calib, QuantConfig(w_bits=4, a_bits=8, pipeline="adaquant", cache_dir=None,
                                               adaquant={"iters": iters, "batch_size": 4}),
                      eval_images=evals, float_logits=float_logits)
        units = q4.report.get("adaquant", {}).get("settings", {}).get("units")
        row["adaquant_w4a8"] = {"iters": iters, "top1_agreement": q4.report["metrics"]["quantized"]["top1_agreement"],
                                "kl": q4.report["metrics"]["quantized"]["kl"], "units": units,
                                "seconds": time.perf_counter() - t}
    except Exception as exc:
        errors["adaquant"] = _error(exc)
        traceback.print_exc(limit=-2)
    row["seconds"] = time.perf_counter() - start
    if not errors:
        del row["error"]
    return row


def onnx_check(qmodel, evals: torch.Tensor, size: int) -> dict:
    """The QDQ export run in ONNX Runtime, against sub8's own fake-quantized outputs."""
    import onnxruntime as ort
    from sub8.export.onnx_qdq import to_onnx

    onnx_model, _ = to_onnx(qmodel.module, (1, 3, size, size))
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: evals.numpy()})[0]
    with torch.no_grad():
        ours = qmodel.module(evals)
    agreement = compare(ours, torch.from_numpy(out))["top1_agreement"]
    return {"top1_agreement_with_sub8": agreement, "nodes": len(onnx_model.graph.node)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all", help="all, torchvision, timm, or specs like torchvision:resnet18,timm:vit_tiny_patch16_224")
    ap.add_argument("--photos", default="data/bench-photos", help="an image folder (make photos)")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2, help="AdaQuant iterations per unit")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    groups = {"torchvision": [f"torchvision:{n}" for n in TORCHVISION], "timm": [f"timm:{n}" for n in TIMM]}
    specs = groups["torchvision"] + groups["timm"] if args.models == "all" else \
        groups.get(args.models) or [s.strip() for s in args.models.split(",") if s.strip()]
    images = ImagesBySize(args.photos, args.calib + args.eval)
    calib, evals = Split(images, 0, args.calib), Split(images, args.calib, args.calib + args.eval)
    rows = []
    print(f"{'model':36} {'capture':8} {'layers':>6} {'params q':>8} {'MACs q':>8} {'products':>9} "
          f"{'W8A8 top1':>9} {'KL':>7} {'ONNX':>6} {'W4A8 AQ':>8} {'s':>6}")
    for spec in specs:
        row = run_one(spec, calib, evals, args.iters)
        rows.append(row)
        products = row.get("products") or {}
        print(f"{spec:36} {row.get('capture', '-'):8} {row.get('layers', 0):6d} "
              f"{100 * row.get('params_quantized', 0):7.2f}% {100 * row.get('macs_quantized', 0):7.2f}% "
              f"{products.get('quantized', 0):4d}/{products.get('quantized', 0) + products.get('float', 0):<4d} "
              f"{row.get('w8a8', {}).get('top1_agreement', float('nan')):9.3f} {row.get('w8a8', {}).get('kl', float('nan')):7.4f} "
              f"{row.get('onnx', {}).get('top1_agreement_with_sub8', float('nan')):6.3f} "
              f"{row.get('adaquant_w4a8', {}).get('top1_agreement', float('nan')):8.3f} {row.get('seconds', 0):6.0f}",
              flush=True)
        for stage, message in (row.get("error") or {}).items():
            print(f"    {stage} failed: {message}")
        for e in row.get("float_ops", [])[:3]:
            print(f"    float: {e['where']} {e['op']} ({100 * e['macs_share']:.2f}% of MACs): {e['reason']}")
        write(args, rows)  # after every model: an interrupted sweep keeps what it measured
    summary = write(args, rows)
    print(f"{summary['quantized_99']} of {summary['models']} models quantize with >= 99% of their MACs quantized "
          f"({100 * summary['share_99']:.1f}%); vision transformers with every attention product quantized: "
          f"{summary['transformers_all_products']} of {summary['transformers']}")
    return 0


def write(args, rows: list[dict]) -> dict:
    summary = summarize(rows)
    write_json_result(args.json, {"settings": {"calib": args.calib, "eval": args.eval, "iters": args.iters,
                                               "photos": os.path.abspath(args.photos)},
                                  "summary": summary, "rows": rows})
    return summary


class ImagesBySize(dict):
    """The photos preprocessed at each input size a model asks for (read once per size)."""

    def __init__(self, folder: str, n: int):
        super().__init__()
        self.folder, self.n = folder, n

    def __missing__(self, size: int) -> torch.Tensor:
        self[size] = load_images(self.folder, imagenet_transform(size, int(size * 256 / 224)), limit=self.n).images
        return self[size]


class Split:
    """Rows lo:hi of ImagesBySize, at any size."""

    def __init__(self, images: ImagesBySize, lo: int, hi: int):
        self.images, self.lo, self.hi = images, lo, hi

    def __getitem__(self, size: int) -> torch.Tensor:
        return self.images[size][self.lo:self.hi]


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("macs_quantized", 0) >= 0.99 and "w8a8" in r]
    vits = [r for r in rows if r["model"] in TRANSFORMERS]
    full = [r for r in vits if (r.get("products") or {}).get("float", 1) == 0 and (r.get("products") or {}).get("quantized", 0) > 0]
    return {"models": len(rows), "quantized_99": len(ok), "share_99": len(ok) / len(rows) if rows else 0.0,
            "transformers": len(vits), "transformers_all_products": len(full),
            "not_quantized": {r["model"]: r.get("error") or f"{100 * r.get('macs_quantized', 0):.2f}% of MACs"
                              for r in rows if r not in ok},
            "onnx_exported": sum(1 for r in rows if "onnx" in r),
            "onnx_refused": {r["model"]: r["error"]["onnx"] for r in rows if "onnx" in (r.get("error") or {})},
            "adaquant_ran": sum(1 for r in rows if "adaquant_w4a8" in r)}


if __name__ == "__main__":
    raise SystemExit(main())
