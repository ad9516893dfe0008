import pytest
import torch

from sub8 import QuantConfig, Sub8Error, calibrate_ranges, prepare
from sub8.calibrate import correct_bias
from sub8.evaluate import compare
from sub8.quant import float_mode
from tinymodels import TinyNet, randomize_bn


def prepared_tiny(w_bits=4, a_bits=8, **kw):
    model = randomize_bn(TinyNet())
    x = torch.rand(48, 3, 32, 32)
    return model, x, prepare(model, x[:1], QuantConfig(w_bits=w_bits, a_bits=a_bits, **kw))


def test_activation_ranges_cover_observed_inputs():
    model, x, p = prepared_tiny(a_bits=8)
    seen = calibrate_ranges(p, x, "minmax")
    for name, layer in p.quant_layers().items():
        aq = layer.input_quantizer
        lo = (aq.qmin - aq.zero_point.round()) * aq.step
        hi = (aq.qmax - aq.zero_point.round()) * aq.step
        s_lo, s_hi = seen[name]
        # min-max covers what was observed, to within one step (zero point rounding)
        assert lo <= min(s_lo, 0) + aq.step and hi >= s_hi - aq.step


def test_nan_in_calibration_activations_names_the_layer():
    model, x, p = prepared_tiny()
    with torch.no_grad():
        p.quant_layers()["block.conv1"].layer.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(Sub8Error, match="block.conv2"):
        calibrate_ranges(p, x, "mse")


def test_bias_correction_removes_the_mean_output_shift():
    model, x, p = prepared_tiny(w_bits=3, a_bits=None, first_last_bits=3)
    calibrate_ranges(p, x, "minmax")
    layer = p.quant_layers()["grouped"]
    captured = {}
    layer.register_forward_hook(lambda m, i, o: captured.__setitem__("in", i[0]))
    with torch.no_grad(), float_mode(p.module):
        p.module(x)
    xin = captured["in"]

    float_bias = layer.layer.bias.detach().clone()

    def shift():
        """Mean per-channel difference of the quantized output from the float output."""
        with torch.no_grad():
            q = layer.apply(xin, layer.weight_quantizer.fake_quant(layer.layer.weight), layer.layer.bias)
            f = layer.apply(xin, layer.layer.weight, float_bias)
        return (q - f).mean(dim=(0, 2, 3))

    shift_before = shift()
    correct_bias(p, x)
    shift_after = shift()
    assert shift_before.abs().max() > 1e-2
    assert shift_after.abs().max() < 1e-5


def test_bias_correction_measures_against_the_float_model_after_weights_moved():
    model, x, p = prepared_tiny(w_bits=8, a_bits=None, first_last_bits=8)
    calibrate_ranges(p, x, "minmax")
    layer = p.quant_layers()["grouped"]
    with torch.no_grad():  # what AdaQuant does: the quantized layer's float weights move
        layer.layer.weight.add_(0.05 * torch.randn_like(layer.layer.weight))
    correct_bias(p, x)
    ref = p.reference.get_submodule("grouped")
    captured = {}
    ref.register_forward_hook(lambda m, i, o: captured.__setitem__("in", i[0]))
    with torch.no_grad(), float_mode(p.reference):
        p.reference(x)
        xin = captured["in"]
        q = layer.apply(xin, layer.weight_quantizer.fake_quant(layer.layer.weight), layer.layer.bias)
        f = ref.apply(xin, ref.layer.weight, ref.layer.bias)
    assert (q - f).mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_bias_correction_brings_outputs_closer():
    model, x, p = prepared_tiny(w_bits=3, a_bits=None, first_last_bits=3)
    calibrate_ranges(p, x[:32], "minmax")
    held_out = x[32:]
    with torch.no_grad():
        ref = model(held_out)
        before = (p.module(held_out) - ref).pow(2).mean()
        correct_bias(p, x[:32])
        after = (p.module(held_out) - ref).pow(2).mean()
    assert after < before


def test_compare_metrics():
    f = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 3.0]])
    q = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.9, 1.0], [0.0, 0.0, 3.0]])
    m = compare(f, q, labels=torch.tensor([0, 2, 2]))
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["n_confident"] == 2 and m["top1_agreement_confident"] == 1.0
    assert m["accuracy"] == pytest.approx(1.0)
    p = torch.softmax(f.double(), 1)
    kl = (p * (torch.log_softmax(f.double(), 1) - torch.log_softmax(q.double(), 1))).sum(1).mean()
    assert m["kl"] == pytest.approx(kl.item())
    same = compare(f, f)
    assert same["kl"] == 0 and same["top1_agreement"] == 1.0


def test_float_mode_bypasses_the_quantizers_it_is_told_to_and_restores_them():
    """Weights quantized, inputs float (by name) equals the model whose activation grids are off."""
    model, x, p = prepared_tiny(w_bits=4, a_bits=4)
    calibrate_ranges(p, x, "minmax")
    layers = p.quant_layers()
    with torch.no_grad():
        everything = p.module(x)
        with float_mode(p.module, lambda name: name.endswith("input_quantizer")):
            weights_only = p.module(x)
        for layer in layers.values():
            layer.input_quantizer.bypass = True
        expected = p.module(x)
        for layer in layers.values():
            layer.input_quantizer.bypass = False
        assert torch.equal(p.module(x), everything)  # restored
    assert torch.equal(weights_only, expected)
    assert not torch.equal(weights_only, everything)
