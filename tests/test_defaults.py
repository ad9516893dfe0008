"""The defaults a new user gets: the recipe, the grids and the ranges chosen by precision, and
evaluation reusing each layer's quantized weight."""

import pytest
import torch
from click.testing import CliRunner

import sub8
from sub8.calibrate.ranges import calibrate_ranges
from sub8.cli import main
from sub8.config import QuantConfig
from sub8.pipeline import pipeline_steps
from sub8.quant.layers import QuantLayer, quant_layers
from sub8.quant.ranges import estimate
from tinymodels import tiny


@pytest.mark.parametrize("settings, steps", [
    ({}, ("ranges", "bias_correction")),                                # W8A8, the default bits
    ({"w_bits": 4, "a_bits": 8}, ("ranges", "adaquant")),
    ({"w_bits": 8, "a_bits": 4}, ("ranges", "adaquant")),
    ({"layer_bits": {"fc": (4, 8)}}, ("ranges", "adaquant")),          # any layer under 8 bits
    ({"first_last_bits": 4}, ("ranges", "adaquant")),
    ({"w_bits": "float", "a_bits": "float", "first_last_bits": "float"}, ("ranges",)),
    ({"w_bits": "float", "a_bits": "float"}, ("ranges", "bias_correction")),  # first/last at 8 bits
    ({"w_bits": 4, "pipeline": "rtn"}, ("ranges",)),                   # an explicit pipeline wins
])
def test_auto_pipeline_picks_the_recipe_by_precision(settings, steps):
    assert pipeline_steps(QuantConfig(**settings)) == steps


def test_auto_ranges_are_minmax_weights_and_percentile_activations_at_8_bits_and_mse_below():
    rows = torch.randn(3, 5000)
    rows[0, 0] = 40.0  # an outlier that MSE clipping cuts at 4 bits
    for bits, weights, method in ((8, False, "percentile"), (8, True, "minmax"), (4, False, "mse"), (4, True, "mse")):
        for symmetric in (False, True):
            auto = estimate(rows, "auto", bits, symmetric, weights=weights)
            chosen = estimate(rows, method, bits, symmetric)
            assert all(torch.equal(a, c) for a, c in zip(auto, chosen))
    # the outlier weight keeps its place on the 8-bit grid
    lo, hi = estimate(rows, "auto", 8, True, weights=True)
    assert hi[0].item() == 40.0


def test_calibrated_8_bit_weight_grids_reach_every_channels_largest_weight():
    model, _ = tiny()
    example = torch.randn(4, 3, 32, 32)
    prepared = sub8.prepare(model, example, QuantConfig(w_bits=8, a_bits=8))
    calibrate_ranges(prepared, example)
    for layer in quant_layers(prepared.module).values():
        q = layer.weight_quantizer
        rows = layer.layer.weight.detach().reshape(q.step.shape[0], -1)
        top = rows.abs().amax(dim=1)
        assert torch.allclose(q.step * q.qmax, top, rtol=1e-6), "a symmetric 8-bit grid ends at the largest |weight|"


def test_weight_grids_are_symmetric_at_8_bits_and_asymmetric_below():
    model, _ = tiny()
    prepared = sub8.prepare(model, torch.randn(1, 3, 32, 32), QuantConfig(w_bits=4, a_bits=8, first_last_bits=8))
    layers = quant_layers(prepared.module)
    sym = {name: layer.weight_quantizer.symmetric for name, layer in layers.items()}
    bits = {name: layer.w_bits for name, layer in layers.items()}
    assert set(bits.values()) == {4, 8}
    assert all(sym[n] == (bits[n] == 8) for n in layers)
    forced = sub8.prepare(model, torch.randn(1, 3, 32, 32), QuantConfig(w_bits=4, w_symmetric=True))
    assert all(layer.weight_quantizer.symmetric for layer in quant_layers(forced.module).values())


def test_cli_refuses_both_weight_grid_flags(tmp_path):
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", str(tmp_path),
                                       "--w-symmetric", "--w-asymmetric", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_a_text_model_keeps_mse_ranges():
    from sub8.adapters import ImageAdapter
    from sub8.adapters.text import TextAdapter
    assert TextAdapter().default_ranges() == "mse" and ImageAdapter().default_ranges() == "auto"


def test_evaluation_reuses_the_quantized_weight_until_something_changes():
    layer = QuantLayer(torch.nn.Conv2d(3, 4, 3), w_bits=4, a_bits=None)
    layer.weight_quantizer.set_range(-torch.ones(4), torch.ones(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = layer(x)
        cached = layer._weight_cache[2]
        assert torch.equal(layer(x), first) and layer._weight_cache[2] is cached  # reused
    with torch.enable_grad():  # training always quantizes afresh, with gradients
        assert torch.equal(layer(x), first) and layer._weight_cache is None
    changes = [lambda: layer.layer.weight.mul_(1.5),
               lambda: layer.weight_quantizer.step.mul_(2.0),
               lambda: layer.load_state_dict({k: v * 0.5 if k == "layer.weight" else v
                                              for k, v in layer.state_dict().items()}),
               lambda: setattr(layer.weight_quantizer, "bits", 3)]
    for change in changes:
        with torch.no_grad():
            before = layer(x)
            change()
            fresh = layer.apply(x, layer.weight_quantizer(layer.layer.weight), layer.layer.bias)
            after = layer(x)
        assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_the_quantized_model_evaluates_the_same_with_and_without_reuse():
    model, _ = tiny()
    q = sub8.quantize(model, torch.randn(16, 3, 32, 32), QuantConfig(w_bits=4, a_bits=8, pipeline="rtn",
                                                                       cache_dir=None))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reused = q(x)
        for layer in quant_layers(q.module).values():
            layer._weight_cache = None
    assert torch.equal(q(x).detach(), reused)  # with gradients: every weight quantized afresh
