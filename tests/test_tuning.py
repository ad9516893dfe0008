"""BN tuning and bias tuning, measured on a small conv+BN model."""

import torch
from torch import nn

from sub8 import QuantConfig, prepare
from sub8.calibrate import calibrate_ranges, tune_batchnorm, tune_biases
from sub8.calibrate.bn_tuning import channel_stats
from sub8.config import BiasTuningConfig
from sub8.quant.layers import float_mode
from tinymodels import tiny


def data(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quantized(w_bits, a_bits, first_last=8, model=None):
    model = model or tiny()[0]
    calib = data(48, 1)
    prepared = prepare(model, calib[:1], QuantConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last))
    calibrate_ranges(prepared, calib)
    return prepared, calib


def stat_gap(prepared, x):
    """Per folded conv: mean over channels of |mean_q - mean_f| / std_f and |std_q / std_f - 1|."""
    names = [i.name for i in prepared.layers if i.bn_folded]
    layers = prepared.quant_layers()
    ref_layers = dict(prepared.reference.named_modules())
    with float_mode(prepared.reference):
        f = channel_stats(prepared.reference, {n: ref_layers[n] for n in names}, x, 16)
    q = channel_stats(prepared.module, {n: layers[n] for n in names}, x, 16)
    out = {}
    for n in names:
        (mf, sf), (mq, sq) = f[n], q[n]
        out[n] = (((mq - mf).abs() / sf).mean().item(), ((sq / sf) - 1).abs().mean().item())
    return out


def test_bn_tuning_moves_channel_statistics_toward_the_float_model():
    prepared, calib = quantized(4, 4)
    before = stat_gap(prepared, calib)
    fresh_before = stat_gap(prepared, data(48, 7))
    record = tune_batchnorm(prepared, calib, batch_size=16)
    after = stat_gap(prepared, calib)
    fresh_after = stat_gap(prepared, data(48, 7))
    assert set(record["layers"]) == {"stem.0", "block.conv1", "block.conv2"} == set(before)
    for n in before:  # on the calibration images, both gaps shrink to a fraction
        assert after[n][0] < 0.2 * before[n][0] + 1e-4, (n, before[n], after[n])
        assert after[n][1] < 0.2 * before[n][1] + 1e-4, (n, before[n], after[n])
    # On images it never saw, the summed gaps still shrink.
    assert sum(sum(v) for v in fresh_after.values()) < 0.5 * sum(sum(v) for v in fresh_before.values())


def test_bn_tuning_keeps_integer_codes():
    prepared, calib = quantized(4, 4)
    layers = prepared.quant_layers()
    codes = {n: l.weight_quantizer.codes(l.layer.weight).clone() for n, l in layers.items()}
    tune_batchnorm(prepared, calib, batch_size=16)
    for n, l in layers.items():
        assert torch.equal(l.weight_quantizer.codes(l.layer.weight), codes[n]), n


def test_bn_tuning_leaves_a_float_model_unchanged():
    prepared, calib = quantized(None, None, first_last=None)
    x = data(8, 3)
    with torch.no_grad():
        before = prepared.module(x)
        record = tune_batchnorm(prepared, calib, batch_size=16)
        assert torch.equal(prepared.module(x), before)
    assert all(r["max_scale_change"] == 0 and r["max_shift"] == 0 for r in record["layers"].values())


def test_bias_tuning_reduces_heldout_kl():
    model = tiny()[0]
    with torch.no_grad():
        model.fc.weight.mul_(40)  # confident outputs, so KL is well above noise
    prepared, calib = quantized(4, 4, model=model)
    weights = {n: p.clone() for n, p in prepared.module.named_parameters() if not n.endswith("bias")}
    record = tune_biases(prepared, calib, BiasTuningConfig(iters=150, batch_size=16, lr=3e-3, holdout=0.25))
    assert record["n_heldout"] == 12
    assert record["heldout_loss_after"] < 0.8 * record["heldout_loss_before"] and not record["reverted"]
    for n, p in prepared.module.named_parameters():  # only biases moved
        if n in weights:
            assert torch.equal(p, weights[n]), n
        assert p.requires_grad  # and nothing was left frozen


def test_bias_tuning_can_train_the_last_layers_input_range():
    model = tiny()[0]
    with torch.no_grad():
        model.fc.weight.mul_(40)
    prepared, calib = quantized(4, 4, model=model)
    last = prepared.quant_layers()[prepared.layers[-1].name].input_quantizer
    others = {n: p.clone() for n, p in prepared.module.named_parameters()
              if not n.endswith("bias") and p is not last.step}
    step = last.step.item()
    cfg = BiasTuningConfig(iters=150, batch_size=16, lr=3e-3, holdout=0.25, input_ranges="last", range_lr=1e-2)
    record = tune_biases(prepared, calib, cfg)
    moved = record["input_ranges"]
    assert list(moved) == [prepared.layers[-1].name] and moved["fc"]["step_before"] == step
    assert moved["fc"]["step_after"] == last.step.item() != step and last.step.item() > 0
    # at most range_lr x the initial step per iteration (Adam's bound), and it still helps
    assert abs(moved["fc"]["step_after"] - step) <= 150 * 1e-2 * step
    assert record["heldout_loss_after"] < 0.8 * record["heldout_loss_before"] and not record["reverted"]
    for n, p in prepared.module.named_parameters():  # nothing else moved
        if n in others:
            assert torch.equal(p, others[n]), n


def test_training_every_input_range_beats_biases_alone_where_mse_ranges_are_too_wide():
    # One wide channel between two linears (x30, the reading weights /30: the float function is
    # the same) stretches the second one's MSE input range, so 4-bit codes round the narrow
    # channels away, as in MobileNetV2's residual stream. Biases cannot undo that; a step can.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[0].weight[0].mul_(30)
        model[0].bias[0].mul_(30)
        model[1].weight[:, 0].div_(30)
        model[1].weight.mul_(8)  # confident outputs
    calib = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for ranges in ("none", "all"):
        prepared = prepare(model, calib[:1], QuantConfig(w_bits=None, a_bits=4, first_last_bits=4))
        calibrate_ranges(prepared, calib)
        cfg = BiasTuningConfig(iters=150, batch_size=16, lr=3e-3, holdout=0.25, input_ranges=ranges)
        results[ranges] = tune_biases(prepared, calib, cfg)
    assert results["none"]["heldout_loss_after"] > 0.9 * results["none"]["heldout_loss_before"]
    record = results["all"]
    assert record["heldout_loss_after"] < 0.2 * record["heldout_loss_before"] and not record["reverted"]
    moved = record["input_ranges"]
    assert set(moved) == {"0", "1"}
    assert moved["1"]["step_after"] < 0.1 * moved["1"]["step_before"]
    assert prepared.quant_layers()["1"].input_quantizer.step.item() == moved["1"]["step_after"] > 0


def test_bias_tuning_that_hurts_the_heldout_loss_is_undone():
    model = tiny()[0]
    with torch.no_grad():
        model.fc.weight.mul_(40)
    prepared, calib = quantized(4, 4, model=model)
    with torch.no_grad():
        before = prepared.module(calib)
    record = tune_biases(prepared, calib, BiasTuningConfig(iters=20, batch_size=4, lr=10.0, holdout=0.25))
    assert record["heldout_loss_after"] > record["heldout_loss_before"] and record["reverted"]
    with torch.no_grad():
        assert torch.equal(prepared.module(calib), before)
