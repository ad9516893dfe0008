"""sub8 against the peer toolkits' defaults, on the same model, photos and metrics, in one run.

    pip install -e '.[peers]'      # torchao, NNCF and Brevitas, pinned; benchmark-only
    python benchmarks/bench_peers.py [--models zoo:mobilenet_v2,zoo:efficientnet_lite0]
        [--photos data/bench-photos] [--samples 256] [--bits W8A8,W4A8,W4A4] [--only NAME,...]

Each tool quantizes the same float model with the same calibration photos (the first --samples
of calib/, in sub8's order) and predicts the same evaluation photos (eval/); every row is
measured against the float model's outputs with sub8's `compare` (top-1 agreement on all photos
and on the confident ones, mean KL(float || quantized)). Seconds are the tool's whole
quantization (calibration included, evaluation excluded). First and last layers at 8 bits where
the tool has that option (sub8, Brevitas); torchao and NNCF quantize every layer alike.

Peers, at their documented defaults:
  - torchao PT2E with X86InductorQuantizer (`get_default_x86_inductor_quantization_config()`,
    8 bits only) and with the XNNPACK quantizer (`get_symmetric_quantization_config(
    is_per_channel=True)`, the ExecuTorch tutorials' setting; at 4 bits its weight_qmin/qmax
    and act_qmin/qmax narrowed to the 4-bit grid);
  - NNCF `nncf.quantize` (default preset) over a DataLoader of batches of 32 (8 bits only: its
    4-bit path, `nncf.compress_weights`, takes Linear/MatMul weights, not convolutions);
  - Brevitas, its ImageNet PTQ example's functions (layerwise backend: first and last layer at
    8 bits; per-channel weights): GPTQ, and learned rounding (AdaRound's hard sigmoid), at 4 bits.
A peer that fails is a row with its exact error. Each row also counts the convolutions and
linear layers the tool really quantized where it can tell (sub8's layers; weights that pass
through a PT2E graph's dequantize_per_channel): a quantizer without a pattern for a model's
blocks leaves them float and looks nearly lossless. Writes benchmarks/results/--name.json;
--update keeps the file's rows of tools this run does not measure. --seeds 0,1,2 repeats the
whole run for each seed, which draws a different calibration set (and seeds sub8): a peer and
sub8 that differ by a few photos differ by what the draw alone moves, or not.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import commit, kept_rows, write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.demo import CPU_ADAQUANT  # noqa: E402
from sub8.evaluate import compare, predict  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

# -- sub8 -----------------------------------------------------------------------------------
def sub8_recipes(w: int, a: int) -> dict[str, dict]:
    """The recipes sub8 runs at one width: its default, and what it is measured against."""
    if (w, a) == (8, 8):
        return {
            "sub8 default": {},
            "sub8 default, --no-requantize": {"requantize": False},
            "sub8 default without channel equalization": {"steps": ("ranges", "bias_correction")},
            "sub8 rtn, symmetric, auto ranges": {"pipeline": "rtn"},
            "sub8 rtn, the old default (asymmetric, mse ranges)": {"pipeline": "rtn", "w_symmetric": False,
                                                                    "ranges": "mse"},
            "sub8 bias correction, asymmetric, mse ranges": {"steps": ("ranges", "bias_correction"),
                                                             "w_symmetric": False, "ranges": "mse"},
        }
    # (the default below 8 bits is this AdaQuant; on a CPU its CPU budget: blocks, with QDrop
    # where activations have fewer than 8 bits; rows of earlier commits used it at A8 too)
    return {"sub8 rtn": {"pipeline": "rtn"},
            "sub8 gptq": {"steps": ("ranges", "gptq")},
            "sub8 adaquant (CPU budget: blocks, QDrop below A8)": {"pipeline": "adaquant", "adaquant": CPU_ADAQUANT}}


def run_sub8(model, calib, w, a, settings, seed):
    config = QuantConfig(w_bits=w, a_bits=a, cache_dir=None, seed=seed, **settings)
    return quantize(model, calib, config).module


# -- torchao PT2E ---------------------------------------------------------------------------
def run_torchao(model, calib, w, a, quantizer_name, batch=32, dims=None):
    from torch.export import export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if quantizer_name == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
        if (w, a) != (8, 8):
            raise NotOffered("X86InductorQuantizer has 8-bit configurations only")
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    else:
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
        qw, qa = 2 ** (w - 1) - 1, 2 ** (a - 1)
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
            is_per_channel=True, weight_qmin=-qw, weight_qmax=qw, act_qmin=-qa, act_qmax=qa - 1))
    # The batch dimension stays dynamic: calibration and evaluation batches differ in size.
    dims = dims or ({0: torch.export.Dim.AUTO},)
    exported = export(model.eval(), (calib[:batch],), dynamic_shapes=dims).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            prepared(calib[i:i + batch])
    return convert_pt2e(prepared)


# -- NNCF -----------------------------------------------------------------------------------
def run_nncf(model, calib, w, a, batch=32, model_type=None):
    """nncf.quantize at its default preset; `model_type` (e.g. "TRANSFORMER") as NNCF's own
    option, for the models NNCF documents it for."""
    if (w, a) != (8, 8):
        raise NotOffered("nncf.quantize quantizes to 8 bits; nncf.compress_weights (4-bit) takes "
                         "Linear/MatMul weights only, not convolutions")
    import copy

    import nncf

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib), batch_size=batch)
    dataset = nncf.Dataset(loader, lambda item: item[0])
    # subset_size counts the dataset's items, here batches: all of them
    typed = {} if model_type is None else {"model_type": getattr(nncf.ModelType, model_type)}
    return nncf.quantize(copy.deepcopy(model).eval(), dataset, subset_size=len(loader), **typed)


# -- Brevitas -------------------------------------------------------------------------------
def run_brevitas(model, calib, w, a, method, batch=32, iters=None):
    import copy

    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common
    from brevitas_examples.imagenet_classification.ptq.ptq_imagenet_args import create_args_parser

    args = create_args_parser().parse_args(["--weight-bit-width", str(w), "--act-bit-width", str(a),
                                            "--target-backend", "layerwise",
                                            "--weight-quant-granularity", "per_channel"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=batch)
    float_model = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=args.graph_eq_iterations,
                                          equalize_merge_bias=args.graph_eq_merge_bias, merge_bn=args.merge_bn)
    quant = ptq_common.quantize_model(
        float_model, backend=args.target_backend, scale_factor_type=args.scale_factor_type,
        bias_bit_width=args.bias_bit_width, weight_bit_width=w, act_bit_width=a,
        weight_quant_granularity=args.weight_quant_granularity, act_quant_percentile=args.act_quant_percentile,
        act_quant_type=args.act_quant_type, quant_format=args.quant_format,
        layerwise_first_last_bit_width=args.layerwise_first_last_bit_width,
        weight_param_method=args.weight_quant_calibration_type, weight_quant_type=args.weight_quant_type,
        act_param_method=args.act_quant_calibration_type, act_quant_granularity=args.act_quant_granularity)
    quant.eval()
    with torch.no_grad():
        quant(calib[:batch])
    ptq_common.calibrate(loader, quant)
    if method == "gptq":
        ptq_common.apply_gptq(loader, quant, act_order=args.gpxq_act_order,
                              create_weight_orig=not args.disable_create_weight_orig,
                              use_quant_activations=args.gptq_use_quant_activations)
    else:
        from brevitas_examples.imagenet_classification.ptq.learned_round_utils import apply_learned_round
        args.learned_round = "hard_sigmoid"
        if iters is not None:
            args.learned_round_iters = iters
        apply_learned_round(quant, loader, args)
    return quant


class NotOffered(Exception):
    """The peer has no configuration at this width (not a failure)."""


# -- the run --------------------------------------------------------------------------------
def tools(w, a, args) -> dict:
    out = {name: ("sub8", settings) for name, settings in sub8_recipes(w, a).items()}
    out["torchao PT2E X86InductorQuantizer default"] = ("torchao", "x86")
    out["torchao PT2E XNNPACKQuantizer per-channel"] = ("torchao", "xnnpack")
    out["NNCF nncf.quantize default preset"] = ("nncf", None)
    if (w, a) != (8, 8):
        out["Brevitas GPTQ"] = ("brevitas", "gptq")
        out[f"Brevitas learned rounding ({args.brevitas_iters} iters/layer)"] = ("brevitas", "learned")
    if args.only:
        out = {k: v for k, v in out.items() if any(o in k for o in args.only.split(","))}
    return out


def coverage(qmodel) -> dict | None:
    """How many convolutions and linear layers a tool actually quantized: sub8's layers with a
    weight grid, or in a PT2E graph the weights that pass through dequantize_per_channel
    (torchao's X86 quantizer leaves layers it has no pattern for in float). None: not counted."""
    from sub8.quant.layers import quant_layers
    layers = quant_layers(qmodel)
    if layers:
        return {"quantized": sum(m.weight_quantizer.enabled for m in layers.values()), "layers": len(layers)}
    try:
        targets = [str(n.target) for n in qmodel.graph.nodes if n.op == "call_function"]
    except Exception:  # (not an fx graph: NNCF's and Brevitas' models)
        return None
    total = sum(("conv" in t or "linear" in t) and "quantize" not in t for t in targets)
    weights = sum("dequantize_per_channel" in t for t in targets)
    return {"quantized": weights, "layers": total} if total else None


def run_tool(kind, option, model, calib, w, a, args, seed):
    if kind == "sub8":
        return run_sub8(model, calib, w, a, option, seed)
    if kind == "torchao":
        return run_torchao(model, calib, w, a, option)
    if kind == "nncf":
        return run_nncf(model, calib, w, a)
    return run_brevitas(model, calib, w, a, option, iters=args.brevitas_iters)


def bits_order(bits: str) -> tuple[int, int]:
    """W8A8 before W4A8 before W4A4."""
    w, a = (int(v) for v in bits[1:].split("A"))
    return (-w, -a)


def tool_order(tool: str) -> int:
    """sub8's rows first, then each peer's (a stable sort keeps each tool's own order)."""
    return next((i for i, p in enumerate(("sub8", "torchao", "NNCF", "Brevitas")) if tool.startswith(p)), 4)


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def same_inputs(spec: str, photos: str, samples: int, seed: int):
    """What every tool gets: the model, the first `samples` calibration photos in sub8's order,
    the evaluation photos, and the float model's logits on them."""
    loaded = load_model(spec)
    calib = load_images(os.path.join(photos, "calib"), loaded.transform, limit=samples, seed=seed,
                        role="calibration").images
    evals = load_images(os.path.join(photos, "eval"), loaded.transform, seed=seed, role="evaluation").images
    return loaded, calib, evals, predict(loaded.module, evals)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="zoo:mobilenet_v2,zoo:efficientnet_lite0")
    ap.add_argument("--photos", default=os.path.join("data", "bench-photos"),
                    help="a folder with calib/ and eval/ (make photos)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--bits", default="W8A8,W4A8,W4A4")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the tool names to run")
    ap.add_argument("--brevitas-iters", type=int, default=200,
                    help="learned-rounding iterations per layer (Brevitas' default 1000 is hours on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, one whole run each (overrides --seed)")
    ap.add_argument("--name", default="peers", help="the result file's name")
    ap.add_argument("--update", action="store_true",
                    help="keep the result file's rows of the model and bit pairs this run does not measure "
                         "(each row names the commit that measured it)")
    args = ap.parse_args(argv)
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    rows = []
    print(f"{'model':20s} {'bits':5s} {'tool':58s} {'conf top1':>9s} {'top1':>6s} {'KL':>7s} {'seconds':>8s}")
    for seed, spec in itertools.product(seeds, args.models.split(",")):
        torch.manual_seed(seed)
        loaded, calib, evals, float_logits = same_inputs(spec, args.photos, args.samples, seed)
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits[1:].split("A"))
            for name, (kind, option) in tools(w, a, args).items():
                row = {"model": spec, "bits": bits, "tool": name, "n_calib": len(calib), "n_eval": len(evals),
                       "seed": seed, "commit": commit()}
                start = time.perf_counter()
                try:
                    qmodel = run_tool(kind, option, loaded.module, calib, w, a, args, seed)
                    row["seconds"] = time.perf_counter() - start
                    row["metrics"] = compare(float_logits, predict(qmodel, evals))
                    row["coverage"] = coverage(qmodel)
                except NotOffered as e:
                    row["not_offered"] = str(e)
                except Exception as e:  # a peer that fails is a result, with its exact error
                    row["error"] = f"{type(e).__name__}: {e}"
                    row["traceback"] = traceback.format_exc(limit=-3)
                rows.append(row)
                m = row.get("metrics")
                if m:
                    print(f"{spec:20s} {bits:5s} {name:58s} {fmt(m['top1_agreement_confident']):>9s} "
                          f"{fmt(m['top1_agreement']):>6s} {fmt(m['kl'], '.4f'):>7s} {row['seconds']:8.1f}",
                          flush=True)
                else:
                    print(f"{spec:20s} {bits:5s} {name:58s} {row.get('not_offered') or row['error'][:200]}",
                          flush=True)
    if args.update:
        key = lambda r: (r["model"], r["bits"], r["tool"], r.get("seed", 0))  # noqa: E731
        rows = kept_rows(args.name, {key(r) for r in rows}, key) + rows
        models = list(dict.fromkeys(r["model"] for r in rows))
        rows.sort(key=lambda r: (models.index(r["model"]), bits_order(r["bits"]), tool_order(r["tool"])))
    path = write_result(args.name, {"args": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
