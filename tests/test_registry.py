"""The method registry: a method registered at run time runs through the API and the CLI, its
settings reach report.json and the allocation cache key; configs and artifacts are versioned."""

import json
import os
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import sub8
from sub8 import QuantConfig, Sub8Error
from sub8.calibrate import AdaQuantConfig
from sub8.registry import register, setting, unregister


@dataclass
class ToyConfig:
    shift: float = setting(0.0, flag="--toy-shift", help="added to every quantized layer's bias")


def _per_layer(config):
    """The toy step treats every layer on its own."""


@pytest.fixture
def toy():
    @register("toy", settings=ToyConfig, per_layer=_per_layer)
    def toy_step(ctx):
        """Add a constant to every quantized layer's bias."""
        with torch.no_grad():
            for layer in ctx.prepared.quant_layers().values():
                layer.layer.bias.add_(ctx.config.toy.shift)
        return {"shift": ctx.config.toy.shift}
    yield
    unregister("toy")


def tiny_data():
    from tinymodels import tiny
    model, _ = tiny()
    return model, torch.randn(16, 3, 32, 32), torch.randn(8, 3, 32, 32)


def test_a_method_registered_at_run_time_runs_through_the_api(toy):
    model, calib, evals = tiny_data()
    base = sub8.quantize(model, calib, QuantConfig(w_bits=8, a_bits=8, steps=("ranges",)), eval_images=evals)
    q = sub8.quantize(model, calib, QuantConfig(w_bits=8, a_bits=8, steps=("ranges", "toy"), toy={"shift": 0.5}),
                      eval_images=evals)
    assert q.report["toy"] == {"shift": 0.5}
    assert q.report["config"]["methods"]["toy"] == {"shift": 0.5}
    assert q.report["metrics"]["quantized"]["kl"] > base.report["metrics"]["quantized"]["kl"]


def test_a_method_registered_at_run_time_gets_its_cli_option(toy, image_dirs, tmp_path):
    from sub8.cli import main
    calib, evals = image_dirs
    out = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                       "--eval", evals, "--steps", "ranges,toy", "--toy-shift", "0.25",
                                       "--out", out])
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "report.json")) as fh:
        report = json.load(fh)
    assert report["toy"] == {"shift": 0.25} and report["config"]["methods"]["toy"] == {"shift": 0.25}
    assert "--toy-shift" in CliRunner().invoke(main, ["quantize", "--help"]).output
    assert sub8.load(out).report["config"]["methods"]["toy"] == {"shift": 0.25}


def test_a_methods_settings_key_the_allocation_cache(toy, tmp_path):
    model, calib, _ = tiny_data()

    def hits(shift):
        config = QuantConfig(steps=("ranges", "toy", "allocate"), toy={"shift": shift}, cache_dir=str(tmp_path),
                             allocation={"size_ratio": 0.3, "precisions": ((8, 8), (4, 8))})
        return sub8.quantize(model, calib, config).report["allocate"]["cache"]["hits"]

    assert hits(0.0) == 0
    assert hits(0.0) > 0          # the same settings read the candidates back
    assert hits(0.1) == 0         # another shift: other candidates, nothing stale is read


def test_adaquant_settings_are_all_checked():
    """The holdout and memory checks once sat after a `return` and never ran."""
    with pytest.raises(Sub8Error, match="holdout"):
        AdaQuantConfig(holdout=1.5)
    with pytest.raises(Sub8Error, match="max_memory_gb"):
        AdaQuantConfig(max_memory_gb=-1)
    with pytest.raises(Sub8Error, match="adaquant.mode"):
        AdaQuantConfig(mode="both")


def test_config_round_trips_and_reads_version_1():
    config = QuantConfig(w_bits=3, adaquant={"iters": 7}, allocation={"size_ratio": 0.2, "ties": ("a*,b*",)},
                         layer_bits={"fc": (8, None)})
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = {"w_bits": 4, "a_bits": 8, "layer_bits": {}, "adaquant": {"mode": "sequential", "iters": 5},
           "allocation": {"precisions": [[8, 8], [4, 4]], "base": [8, 8]}, "bias_tuning": {"iters": 3}}
    migrated = QuantConfig.from_dict(old)
    assert migrated.adaquant.mode == "sequential" and migrated.adaquant.loss == "fisher"  # today's default
    assert migrated.allocation.precisions == ((8, 8), (4, 4)) and migrated.bias_tuning.iters == 3
    with pytest.raises(Sub8Error, match="renamed_option"):
        QuantConfig.from_dict({**old, "adaquant": {"renamed_option": 1}})
    with pytest.raises(Sub8Error, match="newer"):
        QuantConfig.from_dict({"version": 99})


def test_an_artifact_of_format_1_still_loads(tmp_path, image_dirs):
    """A version-1 header (method settings at the top of its config) loads to the same model."""
    from safetensors.torch import load_file, save_file
    from sub8.cli import main
    from sub8.export.artifact import FILENAME, read_header
    calib, _ = image_dirs
    out = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                       "--w-bits", "4", "--pipeline", "rtn", "--out", out])
    assert result.exit_code == 0, result.output
    path = os.path.join(out, FILENAME)
    x = torch.randn(2, 3, 32, 32)
    before = sub8.load(out)(x)
    header, _ = read_header(path)
    config = dict(header["config"])
    config.pop("version")
    methods = config.pop("methods")  # version 1 knew three methods, at the top of its config
    config.update({k: methods[k] for k in ("adaquant", "allocation", "bias_tuning")})
    old = {**header, "version": 1, "config": config}
    save_file(load_file(path), path, metadata={"sub8": json.dumps(old)})
    assert torch.equal(sub8.load(out)(x), before)
    old["version"] = 7
    save_file(load_file(path), path, metadata={"sub8": json.dumps(old)})
    with pytest.raises(Sub8Error, match="format version 7"):
        sub8.load(out)
