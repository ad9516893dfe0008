"""Render docs/benchmarks.md, and the README's headline table, from benchmarks/results/*.json.

    python benchmarks/render_results.py

Numbers come only from the committed result files; each table names its command and commit.
"""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def agreement(m: dict) -> str:
    """The cells every agreement table has: confident top-1 | top-1 | KL."""
    return f"{fmt(m['top1_agreement_confident'])} | {fmt(m['top1_agreement'])} | {fmt(m['kl'])}"


def gptq_tables(r: dict) -> list[str]:
    lines = []
    images = [x for x in r["rows"] if x["model"] == "zoo:mobilenet_v2"]
    if images:
        n = images[0]
        lines += [f"MobileNetV2 (first and last layers at 8 bits), {n['n_calib']} calibration and {n['n_eval']} "
                  f"evaluation photos; agreement with the float model; minutes of the method's own step:", "",
                  "| bits | method | confident top-1 agreement | top-1 agreement | KL | minutes |",
                  "|---|---|---|---|---|---|"]
        for x in images:
            m = x["metrics"]
            lines.append(f"| {x['bits']} | {x['method']} | {agreement(m)} | {fmt(x['step_minutes'], 2)} |")
        lines.append("")
    texts = [x for x in r["rows"] if x["model"] == "zoo:minilm"]
    if texts:
        lines += ["MiniLM on the labelled tweets: accuracy through a logistic-regression head fit on float "
                  "embeddings, frozen:", "", "| bits | method | accuracy | cosine to float | minutes |",
                  "|---|---|---|---|---|"]
        for x in texts:
            m = x["metrics"]
            lines.append(f"| {x['bits']} | {x['method']} | {fmt(m['accuracy'], 4)} | "
                         f"{fmt(m.get('cosine_similarity'), 4)} | {fmt(x.get('step_minutes'), 2)} |")
        lines.append("")
    if r.get("gptq_over_adaquant_time"):
        lines += ["GPTQ's time over AdaQuant's (the same run): " + "; ".join(
            f"{k} {v:.3f}" for k, v in r["gptq_over_adaquant_time"].items()), ""]
    return lines


def eval_speed_table(r: dict) -> list[str]:
    lines = [f"{r['n_eval']} evaluation photos, batch {r['args']['batch']}, {r['threads']} threads, best of "
             f"{r['args']['repeats']}; the float model's forward: {r['float_seconds']:.2f} s.", "",
             "| bits (RTN) | fake-quantized s | over float | weights quantized in every forward s | over float "
             "| BN-folded, quantizers bypassed s |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        again = x.get("weights_requantized_seconds")
        lines.append(f"| {x['bits']} | {x['fake_quant_seconds']:.2f} | {x['fake_quant_over_float']:.2f} | "
                     f"{fmt(again, 2)} | {fmt(x.get('weights_requantized_over_float'), 2)} | "
                     f"{x['folded_float_seconds']:.2f} |")
    return lines + [""]


def peers_table(r: dict, models=None) -> list[str]:
    lines = []
    for model in models or dict.fromkeys(x["model"] for x in r["rows"]):
        rows = [x for x in r["rows"] if x["model"] == model]
        n = rows[0]
        seeded = len({x.get("seed", 0) for x in rows}) > 1  # (a run with --seeds)
        lines += [f"{model}: {n['n_calib']} calibration and {n['n_eval']} evaluation photos; agreement with the "
                  f"float model; seconds of the whole quantization:", "",
                  "| bits | tool | confident top-1 agreement | top-1 agreement | KL | seconds | layers quantized | commit |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in rows:
            at = x.get("commit", r.get("commit"))  # (a run with --update keeps earlier rows)
            if "metrics" in x:
                m = x["metrics"]
                c = x.get("coverage")
                covered = f"{c['quantized']}/{c['layers']}" if c else "not counted"
                tool = f"{x['tool']} (seed {x.get('seed', 0)})" if seeded else x["tool"]
                lines.append(f"| {x['bits']} | {tool} | {agreement(m)} | {x['seconds']:.0f} | {covered} | {at} |")
            else:
                why = x.get("not_offered") or x["error"].splitlines()[0][:160]
                lines.append(f"| {x['bits']} | {x['tool']} | {'not offered' if 'not_offered' in x else 'failed'}: "
                             f"{why.replace('|', '/')} | | | | | {at} |")
        lines.append("")
    return lines


def peers_seeds_table(r: dict) -> list[str]:
    """peers_table run with --seeds: each tool's mean over the calibration draws, and its range."""
    lines = peers_table(r)
    groups = {}
    for x in r["rows"]:
        if "metrics" in x:
            groups.setdefault((x["model"], x["bits"], x["tool"]), []).append(x)
    lines += ["Over the seeds (each a different draw of the calibration photos): mean (lowest to highest).", "",
              "| model | bits | tool | seeds | confident top-1 agreement | confident photos flipped | "
              "top-1 agreement | KL |", "|---|---|---|---|---|---|---|---|"]

    def spread(xs, key, digits=3):
        v = [x["metrics"][key] for x in xs]
        return f"{fmt(sum(v) / len(v), digits)} ({fmt(min(v), digits)} to {fmt(max(v), digits)})"
    for (model, bits, tool), xs in groups.items():
        flipped = [round(x["metrics"]["n_confident"] * (1 - x["metrics"]["top1_agreement_confident"])) for x in xs]
        lines.append(f"| {model} | {bits} | {tool} | {','.join(str(x.get('seed', 0)) for x in xs)} | "
                     f"{spread(xs, 'top1_agreement_confident')} | {', '.join(map(str, flipped))} | "
                     f"{spread(xs, 'top1_agreement')} | {spread(xs, 'kl', 4)} |")
    return lines + [""]


def peers_headline(r: dict) -> list[str]:
    """The README's short form of peers.json: MobileNetV2, the rows that ran."""
    rows = [x for x in r["rows"] if x["model"] == "zoo:mobilenet_v2" and "metrics" in x
            and not any(w in x["tool"] for w in ("asymmetric", "--no-requantize", "without"))]  # (ablations: docs/benchmarks.md)
    if not rows:
        return ["(no results yet)"]
    lines = [f"MobileNetV2, {rows[0]['n_calib']} calibration and {rows[0]['n_eval']} evaluation photos "
             f"(`make photos`); agreement with the float model. All rows, failures and times: "
             f"[docs/benchmarks.md](docs/benchmarks.md).", "",
             "| bits | tool | confident top-1 | top-1 | KL |", "|---|---|---|---|---|"]
    for x in rows:
        m = x["metrics"]
        lines.append(f"| {x['bits']} | {x['tool']} | {agreement(m)} |")
    return lines + [""]


def w8a8_table(r: dict) -> list[str]:
    lines = ["Each row changes one part of the default W8A8 run; the last rows per model run the default model with "
             "one group of its quantizers passing through (no time of their own). On the photos where float is "
             "confident: the mean change of the float top class's logit, and of its margin over the runner-up "
             "(mean ± SD).", "",
             "| model | recipe | confident top-1 | top-1 | KL | top logit change | margin change | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['recipe']} | {agreement(x['metrics'])} | {x['top_logit_change']:+.3f} | "
                     f"{x['margin_change']:+.3f} ± {x['margin_change_sd']:.3f} | {fmt(x['seconds'], 0)} |")
    return lines + [""]


def onnx_table(r: dict) -> list[str]:
    lines = [f"ONNX Runtime {r.get('onnxruntime', '')}, CPU provider; CPU flags {', '.join(r.get('cpu_flags', []))}:",
             "", "| model | batch | median latency ms | images/s | over float |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['batch']} | {x['median_ms']:.2f} | {x['images_per_s']:.1f} | "
                     f"{fmt(x.get('speedup_vs_float'), 2)} |")
    return lines + [""]


def adaquant_quality_table(r: dict) -> list[str]:
    lines = [f"{r['model']}, {r['n_calib']} calibration and {r['n_eval']} evaluation photos, {r['iters']} iterations, "
             f"mini-batch {r['batch_size']}, lr_weight {r['lr_weight']:g}, lr_input_quant {r['lr_input_quant']:g}, "
             f"{r['adaquant_loss']} loss; first and last layers at 8 bits:", "",
             "| bits | method | confident top-1 agreement | top-1 agreement | KL | AdaQuant minutes |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        m = x["metrics"]
        minutes = None if x.get("adaquant_seconds") is None else x["adaquant_seconds"] / 60
        lines.append(f"| {x['bits']} | {x['method']} | {agreement(m)} | {fmt(minutes, 2)} |")
    return lines + [""]


def reconstruct_table(r: dict, mixed: bool = False) -> list[str]:
    """bench_reconstruct's rows; `mixed`: with the allocation's BOPs (its mixed+CONFIG runs)."""
    what = ("per unit at the CPU budget; first and last layers at 8 bits. `mixed+CONFIG`: W8A8, W4A8, W4A4 or W2A4 "
            "per layer by integer programming at the uniform width's BOPs, then the mix fitted with CONFIG."
            if mixed else
            "per unit at the CPU setting (sequential, mini-batch 16); first and last layers at 8 bits. `layer`: "
            "AdaQuant; `block`: each block fitted whole; `+learned`: learned rounding; `+qdrop`: p = 0.5"
            + ("; `+mse`: plain MSE instead of the Fisher-weighted loss; `+equalize`, `+gptq`: that step between the "
               "ranges and the reconstruction, its starting point."
               if any(e in x["config"].split("+") for x in r["rows"] for e in ("mse", "equalize", "gptq")) else "."))
    per_row = len({x.get("iters") for x in r["rows"]}) > 1  # (a run over several iteration counts)
    lines = [f"{r['model']}, {r['n_calib']} calibration and {r['n_eval']} evaluation photos, {r['iters']} iterations "
             + what, "",
             f"| bits | config |{' iterations |' if per_row else ''} seed |{' BOPs / float |' if mixed else ''} "
             "confident top-1 agreement | top-1 agreement | KL | minutes |",
             "|---|---|---|" + ("---|" if mixed else "") + ("---|" if per_row else "") + "---|---|---|---|"]
    for x in r["rows"]:
        bops = ((x.get("allocate") or {}).get("costs") or {}).get("bops", {}).get("ratio")
        cell = f" {fmt(bops, 4) if bops else 'uniform'} |" if mixed else ""
        iters = f" {x['iters']} |" if per_row else ""
        lines.append(f"| {x['bits']} | {x['config']} |{iters} {x['seed']} |{cell} {agreement(x['metrics'])} "
                     f"| {fmt(x['seconds'] / 60, 1)} |")
    return lines + [""]


def reconstruct_memory_table(r: dict) -> list[str]:
    lines = [f"{r['model']}, {r['n_calib']} calibration images 224x224, --max-memory {r['max_memory_gb']:g} GB, "
             f"{r['iters']} iterations per unit (memory does not depend on them), W4A4; the whole process's peak RSS:",
             "", "| config | peak RSS GiB | peak cache GiB | calibration tensor GiB | minutes | commit |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['config']} | {fmt(x['peak_rss_mb'] / 1024, 2)} | {fmt(x['peak_cache_mb'] / 1024, 2)} "
                     f"| {fmt(x['calib_mb'] / 1024, 2)} | {fmt(x['seconds'] / 60, 1)} | {x.get('commit') or r['commit']} |")
    return lines + [""]


def text_table(r: dict) -> list[str]:
    sizes = r["sizes"]
    lines = [f"{r['model']} on {r['data']}: a frozen float logistic-regression head fit on {sizes['fit']} float "
             f"embeddings, tested on {sizes['test']} tweets; {sizes['calib']} calibration tweets; first and last "
             "Linear at 8 bits. `layer`: sequential layer-wise AdaQuant; `block`: each transformer layer fitted "
             "whole with QDrop; `smooth-block`: SmoothQuant, then `block` (the default below 8 bits); `default`: "
             "the default at that width (W8A8: ranges, SmoothQuant, bias correction); `bias-correction`: ranges, "
             f"bias correction; AdaQuant budget {r['args'].get('budget', 'auto')}.", "",
             "| precision | pipeline | accuracy | vs float (points) | cosine to float | seconds |", "|---|---|---|---|---|---|"]
    base = next(x["accuracy"] for x in r["rows"] if x["precision"] == "float")
    for x in r["rows"]:
        if "accuracy" not in x:  # a peer without that width, or one that failed: its words
            lines.append(f"| {x['precision']} | {x['pipeline']} | {x.get('not_offered') or x['error'][:160]} | | | |")
            continue
        lines.append(f"| {x['precision']} | {x['pipeline']} | {100 * x['accuracy']:.2f}% "
                     f"| {100 * (x['accuracy'] - base):+.2f} | {fmt(x['cosine_similarity'], 4)} "
                     f"| {fmt(x.get('seconds'), 0) if x.get('seconds') else ''} |")
    return lines + [""]


def zoo_table(r: dict) -> list[str]:
    s, settings = r["summary"], r["settings"]
    lines = [f"{s['models']} image classifiers with random weights (zero-initialized layers redrawn), "
             f"{settings['calib']} calibration and {settings['eval']} evaluation photos; W8A8 with the default recipe, "
             f"W4A8 AdaQuant (blocks, QDrop) at {settings['iters']} iterations per unit. {s['quantized_99']} of "
             f"{s['models']} have at least 99% of their MACs quantized; vision transformers with every attention "
             f"product quantized: {s['transformers_all_products']} of {s['transformers']}. MACs count weight-bearing "
             "operations and attention's matrix products; random weights make agreement a smoke test, not a quality "
             "measure.", "",
             "| model | capture | layers | params quantized | MACs quantized | attention products | W8A8 top-1 | "
             "W8A8 KL | ONNX vs sub8 top-1 | W4A8 AdaQuant top-1 | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        p = x.get("products") or {}
        total = p.get("quantized", 0) + p.get("float", 0)
        products = f"{p.get('quantized', 0)} of {total}" if total else "-"
        lines.append(f"| {x['model']} | {x.get('capture', '-')} | {x.get('layers', '-')} "
                     f"| {fmt(100 * x['params_quantized'], 1) + '%' if 'params_quantized' in x else '-'} "
                     f"| {fmt(100 * x['macs_quantized'], 2) + '%' if 'macs_quantized' in x else '-'} "
                     f"| {products} "
                     f"| {fmt(x.get('w8a8', {}).get('top1_agreement'))} | {fmt(x.get('w8a8', {}).get('kl'), 4)} "
                     f"| {fmt(x.get('onnx', {}).get('top1_agreement_with_sub8'))} "
                     f"| {fmt(x.get('adaquant_w4a8', {}).get('top1_agreement'))} | {fmt(x.get('seconds'), 0)} |")
    failures = [(x["model"], stage, msg) for x in r["rows"] for stage, msg in (x.get("error") or {}).items()]
    if failures:
        lines += ["", "What failed, and why:", ""] + [f"- {m}, {stage}: {msg}" for m, stage, msg in failures]
    floats = [(x["model"], e) for x in r["rows"] for e in x.get("float_ops", [])]
    if floats:
        lines += ["", "Left in float:", ""] + [f"- {m}: {e['where']} {e['op']} ({100 * e['macs_share']:.2f}% of MACs): "
                                               f"{e['reason']}" for m, e in floats]
    return lines + [""]


def inspect_table(r: dict) -> list[str]:
    lines = []
    for x in r["rows"]:
        ins, m = x["inspect"], x["metrics"]
        lines += [f"### {x['model']} {x['bits']}, the default pipeline", "",
                  f"On all {x['eval_photos']} evaluation photos: confident top-1 {fmt(m['top1_agreement_confident'])}, "
                  f"top-1 {fmt(m['top1_agreement'])}, KL {fmt(m['kl'], 4)}, size ratio {fmt(x['size_ratio'], 4)}. "
                  f"Inspection: {x['inspect_seconds']:.1f} s, ranking on {ins['samples']} photos and measuring the "
                  f"worst again on {ins['fresh_samples']} others; one evaluation of the quantized model on all "
                  f"{x['eval_photos']}: {x['eval_seconds']:.1f} s (inspection / evaluation "
                  f"{x['inspect_over_eval']:.2f}).", "",
                  f"| rank | site | bits | gain restoring it ({ins['loss']}, ranking) | gain on other photos ± SE | "
                  "confirmed | own share: weights | own share: input | SQNR dB | suggested line | "
                  f"{ins['loss']} after (other photos) | size ratio after |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in ins["culprits"]:
            f, s = c["fresh"], c.get("suggestion") or {}
            bits = " ".join(f"{'W' if p == 'weight' else 'A'}{b}" for p, b in c["bits"].items())
            lines.append(f"| {c['rank']} | {c['name']} | {bits} | {fmt(c['restore_gain'], 4)} | "
                         f"{fmt(f['restore_gain'], 4)} ± {fmt(f['restore_gain_se'], 4)} of {fmt(f['loss'], 4)} | "
                         f"{'yes' if c['confirmed'] else 'no'} | {fmt(c['share'].get('weight'), 4)} | "
                         f"{fmt(c['share'].get('input'), 4)} | {fmt(c['sqnr_db'], 1)} | `{s.get('command_line', '')}` | "
                         f"{fmt(s.get('loss'), 4)} | {fmt(s.get('size_ratio'), 4)} |")
        rerun = x.get("rerun_with_first_line")
        if rerun:
            rm = rerun["metrics"]
            lines += ["", f"Run again with `--layer-bits '{rerun['layer_bits']}'`, on all {x['eval_photos']} photos: "
                      f"confident top-1 {fmt(m['top1_agreement_confident'])} -> {fmt(rm['top1_agreement_confident'])}, "
                      f"top-1 {fmt(m['top1_agreement'])} -> {fmt(rm['top1_agreement'])}, KL {fmt(m['kl'], 4)} -> "
                      f"{fmt(rm['kl'], 4)}, size ratio {fmt(x['size_ratio'], 4)} -> {fmt(rerun['size_ratio'], 4)}."]
        lines.append("")
    return lines


def ray_table(r: dict) -> list[str]:
    w = r["wall_seconds"]
    lines = [f"{r['args']['model']}, light pipeline at size ratio <= {r['args']['size_ratio']}: the same allocation "
             f"{r['same']['allocation']}, sensitivities {r['same']['sensitivity']}, metrics {r['same']['metrics']}. "
             f"Wall time: in this process {w['local']:.1f} s, on two Ray nodes of one CPU each (this machine) "
             f"{w['ray']:.1f} s.", "",
             "| stage | tasks | nodes | local: summed task s | Ray: summed task s | Ray: stage wall s | "
             "Ray task time / local |", "|---|---|---|---|---|---|---|"]
    for x in r["stages"]:
        lines.append(f"| {x['stage']} | {x['tasks']} | {x['nodes']} | {fmt(x['local_task_seconds'], 1)} | "
                     f"{fmt(x['ray_task_seconds'], 1)} | {fmt(x['ray_wall_seconds'], 1)} | "
                     f"{fmt(x['ray_task_over_local_task'], 2)} |")
    p = r["predicted_seconds"]
    lines += ["", "Predicted wall time from the Ray run's measured task durations (each distributed stage's tasks "
              "scheduled longest first on N one-CPU nodes; the other steps as measured):", "",
              "| nodes | " + " | ".join(str(n) for n in p) + " |", "|---|" + "---|" * len(p),
              "| seconds | " + " | ".join(fmt(v, 1) for v in p.values()) + " |", ""]
    return lines


RENDERERS = {"adaquant_quality": ("AdaQuant: parallel vs sequential", adaquant_quality_table),
             "gptq": ("GPTQ vs round-to-nearest vs sequential AdaQuant", gptq_tables),
             "eval_speed": ("Evaluating the fake-quantized model against the float forward", eval_speed_table),
             "peers": ("sub8 against torchao, NNCF and Brevitas", peers_table),
             "peers_efficientnet": ("sub8 against torchao and NNCF: EfficientNet-Lite0", peers_table),
             "peers_w8a8_seeds": ("sub8's W8A8 default against torchao and NNCF over calibration draws "
                                  "(six for sub8 and NNCF, three for torchao)", peers_seeds_table),
             "w8a8": ("The W8A8 default's parts, one at a time, next to NNCF", w8a8_table),
             "onnx": ("ONNX Runtime: the exported W8A8 model against float", onnx_table),
             "reconstruct": ("Layer-wise AdaQuant against block reconstruction, learned rounding and QDrop",
                             reconstruct_table),
             "reconstruct_w2a4": ("AdaQuant against block reconstruction with QDrop at W2A4", reconstruct_table),
             "reconstruct_w4a8": ("Block reconstruction with QDrop at W4A8", reconstruct_table),
             "reconstruct_w4a8_qdrop": ("Block reconstruction at W4A8 with and without QDrop", reconstruct_table),
             "reconstruct_w4a8_qdrop_seeds": ("Block reconstruction at W4A8 with and without QDrop: more seeds",
                                              reconstruct_table),
             "reconstruct_w4a8_block400": ("Block reconstruction at W4A8 without QDrop: 400 iterations per block "
                                           "(the CPU default)", reconstruct_table),
             "reconstruct_w8a4": ("Block reconstruction with QDrop at W8A4 (8-bit weights in 4-bit units)",
                                  reconstruct_table),
             "reconstruct_iters": ("Block reconstruction with QDrop: iterations per block", reconstruct_table),
             "reconstruct_w2a4_iters": ("Block reconstruction with QDrop at W2A4: iterations per block",
                                        reconstruct_table),
             "reconstruct_w2a4_1000": ("Block reconstruction with QDrop at W2A4: 1000 iterations per block",
                                       reconstruct_table),
             "reconstruct_iters_seeds": ("Block reconstruction with QDrop: iterations per block, more seeds",
                                         reconstruct_table),
             "reconstruct_seeds": ("AdaQuant against block reconstruction with QDrop at W4A4: more seeds",
                                   reconstruct_table),
             "reconstruct_start": ("Block reconstruction's starting point and loss: equalization, GPTQ, plain MSE",
                                   reconstruct_table),
             "reconstruct_mixed": ("Mixed precision against uniform W4A4, both with block reconstruction",
                                   lambda r: reconstruct_table(r, mixed=True)),
             "reconstruct_mixed_alone": ("Mixed precision with block reconstruction, timed alone",
                                         lambda r: reconstruct_table(r, mixed=True)),
             "reconstruct_memory": ("Peak memory of AdaQuant and block reconstruction: ResNet-50", reconstruct_memory_table),
             "reconstruct_text": ("MiniLM on tweets: layer-wise AdaQuant against transformer-layer reconstruction",
                                  text_table),
             "peers_text": ("sub8 against torchao and NNCF: MiniLM on tweets", text_table),
             "zoo": ("Any model: 24 torchvision and 13 timm architectures", zoo_table),
             "inspect": ("sub8 inspect: the culprits, and what their lines do when a run is redone", inspect_table),
             "ray": ("The light pipeline on a two-node Ray cluster against this process", ray_table)}


def provenance(r: dict) -> str:
    m = r.get("machine", {})
    kept = any(x.get("commit", r.get("commit")) != r.get("commit") for x in r.get("rows", []))
    return (f"`{r.get('command')}` at commit {r.get('commit')}, torch {r.get('versions', {}).get('torch')}, "
            f"{m.get('cpus')} CPUs, {m.get('memory_gb')} GB"
            + ("; the rows of earlier runs that `--update` kept name their own commit" if kept else ""))


def main() -> int:
    results = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as fh:
            results[os.path.splitext(os.path.basename(path))[0]] = json.load(fh)
    doc = ["# Benchmarks", "", "Rendered by `python benchmarks/render_results.py` from `benchmarks/results/*.json`; "
           "edit nothing here by hand.", ""]
    for name, r in results.items():
        title, render = RENDERERS.get(name, (name, lambda r: ["(no table for this file yet)", ""]))
        doc += [f"## {title}", "", f"From `benchmarks/results/{name}.json`: {provenance(r)}.", ""]
        doc += [f"Note: {r['note']}", ""] if r.get("note") else []
        doc += render(r)
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), "w") as fh:
        fh.write("\n".join(doc).rstrip() + "\n")
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as fh:
        readme = fh.read()
    headline = ["(rendered from `benchmarks/results/peers.json` by `python benchmarks/render_results.py`)", ""]
    headline += peers_headline(results["peers"]) if "peers" in results else ["(no results yet)"]
    readme = re.sub(r"<!-- headline:start -->.*?<!-- headline:end -->",
                    lambda _: "<!-- headline:start -->\n" + "\n".join(headline).rstrip() + "\n<!-- headline:end -->",
                    readme, flags=re.S)
    with open(readme_path, "w") as fh:
        fh.write(readme)
    print(f"rendered {len(results)} result file(s) into docs/benchmarks.md and the README")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
