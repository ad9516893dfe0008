import json
import os

import pytest
import torch
from click.testing import CliRunner

from sub8.cli import main

TINY = "python:tinymodels:tiny"
REPORT_KEYS = {"metrics", "layers", "size", "steps", "config", "seed", "versions"}
METRIC_KEYS = {"top1_agreement", "top1_agreement_confident", "n_confident", "top5_agreement", "kl"}


def run(*args):
    return CliRunner().invoke(main, list(args))


def quantize(calib, out, *extra):
    return run("quantize", "--model", TINY, "--calib", calib, "--out", out, "--samples", "8",
               "--w-bits", "8", "--a-bits", "8", *extra)


def assert_clean_error(result, pattern):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert pattern in result.output, result.output


def test_quantize_writes_report_and_loadable_model(image_dirs, tmp_path):
    calib, evals = image_dirs
    out = str(tmp_path / "run")
    result = quantize(calib, out, "--eval", evals)
    assert result.exit_code == 0, result.output
    assert "quantized" in result.output
    report = json.load(open(os.path.join(out, "report.json")))
    assert REPORT_KEYS <= set(report)
    assert METRIC_KEYS <= set(report["metrics"]["float"]) and METRIC_KEYS <= set(report["metrics"]["quantized"])
    assert report["metrics"]["float"]["top1_agreement"] == 1.0
    assert 0 <= report["metrics"]["quantized"]["top1_agreement"] <= 1
    assert {"name", "w_bits", "a_bits", "params", "macs"} <= set(report["layers"][0])
    # the default at W8A8: ranges, channel equalization (the model has a depthwise convolution),
    # bias correction
    assert [s["name"] for s in report["steps"]] == ["prepare", "evaluate", "ranges", "equalize", "bias_correction"]
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in report["steps"])
    assert report["versions"]["torch"] == torch.__version__
    assert 0 < report["size"]["ratio"] < 0.5 and report["calibration"]["n_images"] == 8
    # model.safetensors is the packed artifact; it rebuilds the same model.
    from sub8.export.artifact import read_header
    header, _ = read_header(os.path.join(out, "model.safetensors"))
    assert header["format"] == "sub8.artifact" and header["model"] == "python:tinymodels:tiny"
    import sub8
    from sub8.data import load_images
    from tinymodels import tiny
    qm = sub8.load(out)
    x = load_images(evals, tiny()[1]).images
    again = sub8.quantize(tiny()[0], load_images(calib, tiny()[1], limit=8, seed=0).images,
                          sub8.QuantConfig(w_bits=8, a_bits=8))
    with torch.no_grad():
        assert torch.equal(qm(x), again(x))
    assert not [f for f in os.listdir(tmp_path) if "partial" in f or ".old-" in f]


def test_adaquant_pipeline_records_each_layer(image_dirs, tmp_path):
    calib, _ = image_dirs
    out = str(tmp_path / "run")
    result = quantize(calib, out, "--pipeline", "adaquant", "--adaquant", "sequential", "--reconstruct", "layer", "--iters", "3",
                      "--batch-size", "4", "--samples", "10", "--lr-schedule", "constant",
                      "--adaquant-loss", "fisher", "--fisher-draws", "2")
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "report.json")))
    assert [s["name"] for s in report["steps"]] == ["prepare", "ranges", "adaquant"]
    record = report["adaquant"]
    assert record["settings"]["mode"] == "sequential" and record["settings"]["iters"] == 3
    assert record["settings"]["lr_schedule"] == "constant"
    assert record["settings"]["loss"] == "fisher" and record["settings"]["fisher_draws"] == 2
    assert record["n_train"] == 9 and record["n_heldout"] == 1
    assert [r["name"] for r in record["layers"]] == [layer["name"] for layer in report["layers"]]
    assert all(r["heldout_mse_before"] >= 0 and r["heldout_mse_after"] >= 0 for r in record["layers"])
    assert all(r["heldout_fisher_before"] >= 0 and r["heldout_fisher_after"] >= 0 for r in record["layers"])
    # every layer's input step as the ranges set it and as AdaQuant left it
    stepped = [r for r in record["layers"] if "input_step" in r]
    assert len(stepped) == len(record["layers"]) and all(r["input_step"]["after"] > 0 for r in stepped)


def test_rerun_into_a_previous_run_and_force(image_dirs, tmp_path):
    calib, _ = image_dirs
    out = str(tmp_path / "run")
    assert quantize(calib, out).exit_code == 0
    assert quantize(calib, out).exit_code == 0  # an earlier sub8 run may be replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert_clean_error(quantize(calib, str(other)), "not a sub8 run")
    assert (other / "precious.txt").read_text() == "keep me"
    assert quantize(calib, str(other), "--force").exit_code == 0


@pytest.mark.parametrize("spec, message", [
    ("zoo:resnet9000", "unknown zoo model"),
    ("nonsense", "unknown model spec"),
    ("torchvision:resnet18", "needs --weights"),
    ("python:no_such_module:fn", "cannot import"),
    ("python:tinymodels:missing", "has no attribute"),
    ("python:tinymodels:not_a_model", "must return an nn.Module"),
])
def test_bad_model_specs(image_dirs, tmp_path, spec, message):
    calib, _ = image_dirs
    result = run("quantize", "--model", spec, "--calib", calib, "--out", str(tmp_path / "o"))
    assert_clean_error(result, message)
    assert not (tmp_path / "o").exists()


def test_weights_files(image_dirs, tmp_path):
    calib, _ = image_dirs
    out = str(tmp_path / "o")
    spec = "python:tinymodels:tiny_module_only"
    missing = run("quantize", "--model", spec, "--weights", str(tmp_path / "nope.pt"), "--calib", calib, "--out", out)
    assert_clean_error(missing, "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    assert_clean_error(run("quantize", "--model", spec, "--weights", str(corrupt), "--calib", calib, "--out", out),
                       "not a readable PyTorch checkpoint")
    from tinymodels import tiny
    model = tiny()[0]
    pickled = tmp_path / "whole_model.pt"
    torch.save(model, pickled)  # a pickled module, not a state dict
    assert_clean_error(run("quantize", "--model", spec, "--weights", str(pickled), "--calib", calib, "--out", out),
                       "not a plain state dict")
    truncated = tmp_path / "truncated.pt"
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    truncated.write_bytes(good.read_bytes()[:200])
    assert_clean_error(run("quantize", "--model", spec, "--weights", str(truncated), "--calib", calib, "--out", out),
                       "not a readable PyTorch checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    assert_clean_error(run("quantize", "--model", spec, "--weights", str(wrong), "--calib", calib, "--out", out),
                       "do not fit the model")
    ok = run("quantize", "--model", spec, "--weights", str(good), "--calib", calib, "--out", out,
             "--samples", "4", "--w-bits", "8", "--a-bits", "8")
    assert ok.exit_code == 0, ok.output
    assert not os.path.exists(os.path.join(tmp_path, "o", "precious"))


def test_calibration_folders(tmp_path, image_dirs):
    calib, _ = image_dirs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(quantize(str(empty), str(tmp_path / "o")), "holds no image")
    assert_clean_error(quantize(str(tmp_path / "missing"), str(tmp_path / "o")), "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.jpg").write_bytes(b"definitely not a jpeg")
    assert_clean_error(quantize(str(broken), str(tmp_path / "o")), "no readable image (3 unreadable)")
    # Unreadable files among good ones are skipped with a warning, and counted in the report.
    (tmp_path / "calib" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    result = run("quantize", "--model", TINY, "--calib", calib, "--out", str(tmp_path / "o"),
                 "--w-bits", "8", "--a-bits", "8")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable calibration file" in result.output
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert report["calibration"]["skipped"] == 1 and report["calibration"]["n_images"] == 12


@pytest.mark.parametrize("flag, value, message", [
    ("--w-bits", "9", "bits must be in 2..8"),
    ("--a-bits", "1", "bits must be in 2..8"),
    ("--first-last-bits", "x", "bits must be an integer"),
    ("--layer-bits", "fc", "PATTERN=W[,A]"),
    ("--pipeline", "magic", "--pipeline magic: choose one of auto, rtn"),
    ("--steps", "ranges,magic", "unknown step"),
    ("--holdout", "1.5", "holdout must be in (0, 1)"),
])
def test_bad_options(image_dirs, tmp_path, flag, value, message):
    calib, _ = image_dirs
    result = run("quantize", "--model", TINY, "--calib", calib, "--out", str(tmp_path / "o"), flag, value)
    assert_clean_error(result, message)
    assert not (tmp_path / "o").exists()


def test_nan_activations_name_the_layer(image_dirs, tmp_path):
    calib, _ = image_dirs
    result = run("quantize", "--model", "python:tinymodels:tiny_with_nan", "--calib", calib,
                 "--out", str(tmp_path / "o"))
    assert_clean_error(result, "NaN or Inf in the input of layer 'block.conv2'")
    assert not (tmp_path / "o").exists()


def test_labels_from_folders(tmp_path, image_dirs):
    from conftest import write_images
    calib, _ = image_dirs
    labelled = tmp_path / "labelled"
    for cls in ("3", "7"):
        write_images(str(labelled / cls), 3, seed=int(cls))
    result = run("quantize", "--model", TINY, "--calib", calib, "--eval", str(labelled), "--labels", "folders",
                 "--out", str(tmp_path / "o"), "--w-bits", "8", "--a-bits", "8")
    assert result.exit_code == 0, result.output
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert "accuracy" in report["metrics"]["float"] and "accuracy" in report["metrics"]["quantized"]
    assert report["metrics"]["float"]["n_images"] == 6


def test_eval_steps_last_measures_once_and_ends_the_same(image_dirs, tmp_path):
    calib, evals = image_dirs
    reports = {}
    for when in ("all", "last"):
        out = str(tmp_path / when)
        result = quantize(calib, out, "--eval", evals, "--eval-steps", when, "--fresh",
                          "--steps", "ranges,equalize,bias_correction")
        assert result.exit_code == 0, result.output
        reports[when] = json.load(open(os.path.join(out, "report.json")))
    measured = {when: [s["name"] for s in r["steps"] if "metrics" in s] for when, r in reports.items()}
    assert measured == {"all": ["ranges", "equalize", "bias_correction"], "last": ["bias_correction"]}
    assert reports["last"]["metrics"] == reports["all"]["metrics"]


def test_light_pipeline_allocates_and_the_mixed_model_reloads(image_dirs, tmp_path):
    import sub8
    from sub8.data import load_images
    from tinymodels import tiny
    calib, evals = image_dirs
    out = str(tmp_path / "run")
    result = quantize(calib, out, "--pipeline", "light", "--size-ratio", "0.22", "--eval", evals,
                      "--precisions", "W4A8,W2A4", "--tie", "block.*", "--bias-tune-ranges", "all")
    assert result.exit_code == 0, result.output
    assert "bits allocated (milp, kl)" in result.output and "within budget 0.22" in result.output, result.output
    report = json.load(open(os.path.join(out, "report.json")))
    a = report["allocate"]
    assert a["precisions"] == ["W8A8", "W4A8", "W2A4"]
    assert a["choice"]["block.conv1"] == a["choice"]["block.conv2"]  # tied
    assert report["size"]["ratio"] <= 0.22
    assert [s["name"] for s in report["steps"]] == ["prepare", "evaluate", "allocate", "bn_tuning", "bias_tuning"]
    assert all("top1_agreement" in s["metrics"] for s in report["steps"][2:])  # after each step
    assert {"stem.0", "block.conv1", "fc"} <= set(report["bias_tuning"]["input_ranges"])
    x = load_images(evals, tiny()[1]).images
    qm = sub8.load(out)
    assert {i.name: f"W{i.w_bits}A{i.a_bits}" for i in qm.prepared.layers if i.name in a["choice"]} == a["choice"]
    model = tiny()[0]
    again = sub8.quantize(model, load_images(calib, tiny()[1], limit=8, seed=0).images,
                          sub8.QuantConfig(pipeline="light", allocation={"size_ratio": 0.22,
                                                                         "precisions": ((4, 8), (2, 4)),
                                                                         "ties": ("block.*",)},
                                           bias_tuning={"input_ranges": "all"}))
    with torch.no_grad():  # the API and the CLI run the same steps
        assert torch.equal(qm(x), again(x))
    infeasible = quantize(calib, str(tmp_path / "o2"), "--pipeline", "light", "--size-ratio", "0.01")
    assert_clean_error(infeasible, "size_ratio 0.01 (the least reachable is 0.1")
    assert_clean_error(quantize(calib, str(tmp_path / "o3"), "--pipeline", "light"), "needs a budget")


def test_pareto_writes_table_json_and_plot(image_dirs, tmp_path):
    calib, evals = image_dirs
    out = tmp_path / "front"
    result = run("pareto", "--model", TINY, "--calib", calib, "--eval", evals, "--samples", "8",
                 "--size-ratios", "0.01,0.2,0.3", "--out", str(out))
    assert result.exit_code == 0, result.output
    front = json.load(open(out / "pareto.json"))
    assert "least reachable" in front["points"][0]["error"]
    sizes = [p["size_ratio"] for p in front["points"][1:]]
    assert sizes[0] <= 0.2 and sizes[1] <= 0.3
    assert [u["precision"] for u in front["uniform"]] == ["W8A8", "W4A8", "W4A4", "W2A4"]
    w8, w4a8, w4a4, w2 = (u["size_ratio"] for u in front["uniform"])
    assert w8 > w4a8 == w4a4 > w2  # activation bits cost no weight memory
    assert (out / "pareto.svg").read_text().startswith("<svg") and "uniform W4A8" in (out / "pareto.md").read_text()
