"""sub8 inspect: the layer that hurts is found, measured against direct computations, and its
suggested line fixes the loss; report.html renders with its figures in headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

import sub8
import tinymodels
from sub8.analyzer import InspectSettings, candidate_fixes, channels_last, float_copy, sites_of
from sub8.cli import main
from sub8.config import parse_layer_bits
from sub8.evaluate import output_loss

OUTLIER = "python:tinymodels:tiny_with_outlier"


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def kl_to_float(module, reference, x):
    with torch.no_grad():
        return output_loss("kl", module(x), reference(x)).item() / len(x)


@pytest.fixture(scope="module")
def outlier_run():
    model, _ = tinymodels.tiny_with_outlier()
    calib = images(48, seed=1)
    q = sub8.quantize(model, calib, sub8.QuantConfig(pipeline="rtn", cache_dir=None), inspect=InspectSettings(samples=24))
    return model, calib, q


def test_the_outlier_layer_ranks_first_and_its_line_fixes_most_of_the_loss(outlier_run):
    model, calib, q = outlier_run
    ins = q.report["inspect"]
    first = ins["culprits"][0]
    assert first["name"] == "grouped" and first["rank"] == 1
    # its input grid is the larger problem; its weights for the tiny channel round to 0 too
    assert first["share"]["input"] > first["share"]["weight"] > 0
    assert first["restore_gain"] > 0.8 * ins["baseline"]["loss"]
    # and again on the 24 calibration samples the ranking did not use
    assert first["confirmed"] and first["fresh"]["samples"] == 24
    assert first["fresh"]["restore_gain"] > 0.8 * first["fresh"]["loss"]
    # the error is visible where it starts: the lowest SQNR along the network is its output
    sqnr = {s["name"]: s["sqnr_db"] for s in ins["sites"]}
    assert min(sqnr, key=sqnr.get) == "grouped"
    suggestion = first["suggestion"]
    assert suggestion["recovered"] >= 0.8 and suggestion["command_line"] == f"--layer-bits '{suggestion['layer_bits']}'"
    assert suggestion["layer_bits"].startswith("grouped=")
    # a user who copies the line and reruns loses most of the loss, measured on other photos
    fixed = sub8.quantize(model, calib, sub8.QuantConfig(pipeline="rtn", cache_dir=None,
                                                         layer_bits=parse_layer_bits([suggestion["layer_bits"]])))
    held_out = images(32, seed=7)
    before, after = kl_to_float(q.module, model, held_out), kl_to_float(fixed.module, model, held_out)
    assert after < 0.2 * before, (before, after)


def test_shares_gains_and_errors_equal_direct_computations(outlier_run):
    """Each number inspect gets from suffix reruns with swapped sites, computed again by whole
    forwards of models built separately: the float model with one site's quantizer copied in,
    and the quantized model with one site's weights and quantizers set to float."""
    model, calib, q = outlier_run
    ins = q.report["inspect"]
    x, _ = sub8.analyzer.split_samples(calib, 24, 0, 0)

    def run(module, inputs=x):  # in inspect's layout (channels last), one batch as inspect ran it
        with channels_last(module), torch.no_grad():
            return module(inputs.contiguous(memory_format=torch.channels_last))
    reference = float_copy(q.prepared.reference)
    float_out = run(reference)
    rows = {s["name"]: s for s in ins["sites"]}
    for name in ("grouped", "block.conv1", "requant_add_0"):
        kind, q_site = sites_of(q.module)[name]
        for part, value in rows[name]["share"].items():
            alone = float_copy(q.prepared.reference)
            site = alone.get_submodule(name)
            quantizer = q_site.weight_quantizer if part == "weight" else q_site.input_quantizer
            if part == "weight":
                site.layer.load_state_dict(q_site.layer.state_dict())
            target = site.weight_quantizer if part == "weight" else site.input_quantizer
            target.load_state_dict(quantizer.state_dict())
            target.bits, target.signed, target.symmetric, target.bypass = (quantizer.bits, quantizer.signed,
                                                                            quantizer.symmetric, False)
            direct = output_loss("kl", run(alone), float_out).item() / len(x)
            assert value == pytest.approx(direct, rel=1e-6, abs=1e-12), (name, part)
        restored = float_copy(q.prepared.reference)
        full = __import__("copy").deepcopy(q.module)
        full.set_submodule(name, restored.get_submodule(name))
        direct_gain = ins["baseline"]["loss"] - output_loss("kl", run(full), float_out).item() / len(x)
        assert rows[name]["restore_gain"] == pytest.approx(direct_gain, rel=1e-6, abs=1e-12)
    # relative MSE of the first layer's output, from its own input (the same for both models)
    first = q.report["layers"][0]["name"]
    f_out, q_out = run(reference.get_submodule(first)), run(q.module.get_submodule(first))
    rel = ((q_out.double() - f_out.double()) ** 2).sum() / (f_out.double() ** 2).sum()
    assert rows[first]["relative_mse"] == pytest.approx(rel.item(), rel=1e-6)


def test_candidate_fixes_raise_only_what_is_quantized_cheapest_first():
    # weight bits cost 4 times activation bits (they are stored): 4, 16, 20, 28, 112, 140
    assert candidate_fixes("layer", {"weight": 4, "input": 4}) == [
        {"input": 8}, {"weight": 8}, {"weight": 8, "input": 8}, {"input": None}, {"weight": None},
        {"weight": None, "input": None}]
    assert candidate_fixes("layer", {"weight": 8, "input": None}) == [{"weight": None}]
    assert candidate_fixes("junction", {"input": 8}) == [{"input": None}]


def run_cli(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_inspect_on_a_finished_run_and_its_errors(image_dirs, tmp_path):
    calib, evals = image_dirs
    out = str(tmp_path / "run")
    done = run_cli("quantize", "--model", OUTLIER, "--calib", calib, "--out", out, "--pipeline", "rtn")
    assert done.exit_code == 0, done.output
    assert "inspect" not in json.load(open(os.path.join(out, "report.json")))
    result = run_cli("inspect", out, "--data", evals, "--samples", "8")
    assert result.exit_code == 0, result.output
    assert "1. grouped (layer W8 A8)" in result.output and "fix: --layer-bits 'grouped=" in result.output
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["inspect"]["samples"] == 8 and report["inspect"]["culprits"][0]["name"] == "grouped"
    assert "Inspect: the layers that hurt" in open(os.path.join(out, "report.html")).read()
    # bad input: one clear line, nothing written
    for args, message in [(("inspect", str(tmp_path), "--data", evals), "not a finished `sub8 quantize` folder"),
                          (("inspect", out, "--data", str(tmp_path / "none")), "none"),
                          (("inspect", out, "--data", evals, "--samples", "0"), "--inspect-samples")]:
        bad = run_cli(*args)
        assert bad.exit_code == 2 and "Traceback" not in bad.output and message in bad.output, bad.output


# -- report.html in a real browser ---------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("SUB8_REQUIRE_BROWSER"),
                                   reason="headless Chromium is not installed (.ci/run installs it)")


def rendered_dom(path, tmp_path) -> str:
    """The page's DOM after Chromium loaded it and ran its script (--dump-dom)."""
    assert CHROMIUM, "SUB8_REQUIRE_BROWSER is set but no chromium is installed"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom"]
    done = subprocess.run([CHROMIUM, *flags, f"file://{os.path.abspath(path)}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def figures(dom: str) -> dict[str, str]:
    """{figure id: its svg markup} from a dumped DOM."""
    from html.parser import HTMLParser

    class Figures(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self.current, self.depth, self.body = {}, None, 0, {}

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "body":
                self.body = attrs
            if tag == "svg" and "figure" in (attrs.get("class") or ""):
                self.current, self.depth = attrs["id"], 0
                self.found[self.current] = []
            if self.current:
                self.depth += tag == "svg"
                self.found[self.current].append(tag)

        def handle_endtag(self, tag):
            if self.current and tag == "svg":
                self.depth -= 1
                if self.depth == 0:
                    self.current = None

    parser = Figures()
    parser.feed(dom)
    return parser.found, parser.body


@needs_browser
def test_report_html_renders_every_figure_in_chromium(image_dirs, tmp_path):
    calib, evals = image_dirs
    out = tmp_path / "run"
    done = run_cli("quantize", "--model", OUTLIER, "--calib", calib, "--eval", evals, "--out", str(out),
                   "--steps", "ranges,allocate", "--size-ratio", "0.25", "--inspect", "--inspect-samples", "8",
                   "--samples", "8")
    assert done.exit_code == 0, done.output
    page = (out / "report.html").read_text()
    # self-contained: nothing to fetch (the only URLs are the SVG namespaces' names)
    assert not re.search(r"(src|href)=\"(https?:|//)|url\((?!#)|<link|@import", page)
    assert len(re.findall(r"https?://", page)) == page.count("xmlns")
    found, body = figures(rendered_dom(out / "report.html", tmp_path))
    expected = {"fig-bits", "fig-steps", "fig-sensitivity", "fig-degradation", "fig-culprits", "fig-error-growth",
                "fig-histogram-0"}
    assert expected <= set(found), sorted(found)
    assert int(body["data-figures"]) == len(found)  # the page's own script ran and counted them
    for name, tags in found.items():  # each figure drew something: paths and text
        assert tags.count("path") >= 3 and "text" in tags, (name, tags[:20])


@needs_browser
def test_a_text_model_report_renders(tmp_path):
    from sub8.page import report_page
    from test_text import tiny_encoder, tokens
    model = tiny_encoder()
    calib, evals = tokens([3, 17, 9, 1, 12, 6, 8, 4], seed=2), tokens([5, 9, 14, 3], seed=3)
    q = sub8.quantize(model, calib, sub8.QuantConfig(pipeline="rtn", cache_dir=None), eval_images=evals,
                      inspect=InspectSettings(samples=4, top=2))
    ins = q.report["inspect"]
    assert ins["loss"] == "mse" and {"embedding", "operand", "layer"} <= {s["kind"] for s in ins["sites"]}
    assert "cosine_similarity" in ins["baseline"]["metrics"]
    path = tmp_path / "report.html"
    path.write_text(report_page(q.report))
    found, body = figures(rendered_dom(path, tmp_path))
    assert {"fig-bits", "fig-steps", "fig-culprits", "fig-error-growth"} <= set(found)
    assert int(body["data-figures"]) == len(found)


@needs_browser
def test_pareto_page_renders(image_dirs, tmp_path):
    calib, evals = image_dirs
    out = tmp_path / "front"
    done = run_cli("pareto", "--model", "python:tinymodels:tiny", "--calib", calib, "--eval", evals,
                   "--samples", "8", "--size-ratios", "0.2", "--out", str(out))
    assert done.exit_code == 0, done.output
    found, _ = figures(rendered_dom(out / "report.html", tmp_path))
    assert "fig-pareto" in found and found["fig-pareto"].count("path") >= 3
