"""GPTQ: the blocked Cholesky form against a float64 step-by-step OBS reference, the Hessian's
column order against the convolution itself, and the step on conv, depthwise, grouped and
linear layers, images and text."""

import pytest
import torch
import torch.nn.functional as F

from sub8 import QuantConfig, Sub8Error, quantize
from sub8.methods.gptq import HessianAccumulator, gptq, quantize_columns
from sub8.quant.layers import QuantLayer


def reference_gptq(w, h, step, zero, qmin, qmax, damp):
    """Column by column with the inverse of the remaining columns' Hessian recomputed each time
    (the optimal-brain-surgeon update, no Cholesky, no blocks), in float64."""
    w, h = w.clone(), h.clone()
    d = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(d, dtype=h.dtype)
    q = torch.zeros_like(w)
    for j in range(d):
        hinv = torch.linalg.inv(h[j:, j:])
        q[:, j] = quantize_columns(w[:, j], step, zero, qmin, qmax)
        err = (w[:, j] - q[:, j]) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
    return q


def correlated_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


@pytest.mark.parametrize("block_size", [1, 3, 128])
def test_gptq_matches_the_step_by_step_float64_reference(block_size):
    g = torch.Generator().manual_seed(0)
    rows, d, bits = 6, 11, 3
    w = torch.randn(rows, d, generator=g, dtype=torch.float64)
    x = correlated_inputs(200, d, 1)
    x[:, 4] = 0.0  # a dead input
    h = 2 * x.T @ x / len(x)
    step = (w.abs().amax(1) / 2).double()
    zero = torch.full((rows,), 4.0, dtype=torch.float64)
    expected = reference_gptq(w, h, step, zero, 0, 2 ** bits - 1, 0.01)
    got = gptq(w[None], h[None], step[None], zero[None], 0, 2 ** bits - 1, block_size, 0.01)[0]
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)
    # on the grid, and better than rounding each weight to nearest on these inputs
    codes = got / step[:, None] + zero[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-9)


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    """Summed over ten random layers with correlated inputs, at 3 bits."""
    errors = {"gptq": 0.0, "rtn": 0.0}
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 11, generator=g, dtype=torch.float64)
        x = correlated_inputs(200, 11, seed + 100)
        step, zero = w.abs().amax(1) / 3, torch.full((6,), 4.0, dtype=torch.float64)
        q = gptq(w[None], (2 * x.T @ x / len(x))[None], step[None], zero[None], 0, 7)[0]
        errors["gptq"] += ((x @ (w - q).T) ** 2).mean().item()
        rtn = quantize_columns(w, step[:, None], zero[:, None], 0, 7)
        errors["rtn"] += ((x @ (w - rtn).T) ** 2).mean().item()
    assert errors["gptq"] < 0.85 * errors["rtn"]


@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (4, 4, 4), (2, 4, 6)])
def test_hessian_columns_are_the_convolutions_own(groups, cin, cout):
    """W_g @ (the accumulator's columns) reproduces the convolution, so H = 2 X X^T is the
    Hessian of exactly this layer's output error, per group."""
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, stride=2, groups=groups, bias=False).double()
    layer = QuantLayer(conv, 8, None)
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    cols = F.unfold(x, 3, padding=1, stride=2).reshape(2, groups, -1, 20).permute(1, 2, 0, 3).reshape(groups, -1, 40)
    w = conv.weight.reshape(groups, cout // groups, -1)
    out = (w @ cols).reshape(cout, 2, 20).permute(1, 0, 2)
    assert torch.allclose(out.reshape(2, cout, 5, 4), F.conv2d(x, conv.weight, None, 2, 1, 1, groups))
    acc = HessianAccumulator(layer)
    acc(layer, x.float())
    assert acc.hessian().shape == (groups, cin // groups * 9, cin // groups * 9)
    assert torch.allclose(acc.hessian(), 2 * cols @ cols.transpose(1, 2) / 40, rtol=1e-4, atol=1e-4)


def fidelity_kl(steps, mode="sequential"):
    from tinymodels import randomize_bn, TinyNet
    torch.manual_seed(0)
    model = randomize_bn(TinyNet()).eval()
    calib, evals = torch.randn(48, 3, 32, 32), torch.randn(32, 3, 32, 32)
    config = QuantConfig(w_bits=3, a_bits=8, first_last_bits=8, steps=steps, gptq={"mode": mode}, cache_dir=None)
    q = quantize(model, calib, config, eval_images=evals)
    return q.report


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_gptq_step_beats_round_to_nearest_on_conv_depthwise_grouped_and_linear(mode):
    rtn = fidelity_kl(("ranges",))["metrics"]["quantized"]["kl"]
    report = fidelity_kl(("ranges", "gptq"), mode)
    kinds = {layer["kind"] for layer in report["layers"]}
    assert {"conv", "depthwise", "grouped", "linear"} <= kinds
    rec = report["gptq"]
    assert len(rec["layers"]) == len(report["layers"]) and rec["settings"]["mode"] == mode
    for layer in rec["layers"]:  # on GPTQ's own objective the kept rounding is the better one
        assert layer["kept"] == ("gptq" if layer["gptq_error"] <= layer["rtn_error"] else "rtn")
    assert sum(layer["kept"] == "gptq" for layer in rec["layers"]) >= len(rec["layers"]) - 2  # the 3-bit ones
    assert report["metrics"]["quantized"]["kl"] < rtn


def test_gptq_needs_ranges_first_and_parallel_before_allocation():
    with pytest.raises(Sub8Error, match="ranges"):
        fidelity_kl(("bias_correction", "gptq"))
    config = QuantConfig(steps=("ranges", "gptq", "allocate"), allocation={"size_ratio": 0.2})
    from sub8.pipeline import pipeline_steps, split_recipe
    with pytest.raises(Sub8Error, match="gptq-mode parallel"):
        split_recipe(config, pipeline_steps(config))


def test_gptq_on_a_text_encoder_lowers_the_layer_errors():
    pytest.importorskip("transformers")
    from test_text import tiny_encoder, tokens
    model = tiny_encoder()
    calib = tokens([5, 9, 3, 12, 7, 8, 10, 4] * 4, pad_to=16, seed=1)
    config = QuantConfig(w_bits=3, a_bits=8, steps=("ranges", "gptq"), cache_dir=None)
    report = quantize(model, calib, config).report
    layers = report["gptq"]["layers"]
    assert len(layers) == len(report["layers"])
    assert sum(r["gptq_error"] for r in layers) < 0.8 * sum(r["rtn_error"] for r in layers)
