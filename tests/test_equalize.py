"""Channel equalization: the float model is unchanged, a depthwise input's per-tensor grid is a
per-channel grid on the plain input with the weight codes unchanged, the factor is SmoothQuant's
on a pointwise input, and the factors fold into the producing layers of an integer ONNX export."""

import collections
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save
from tinymodels import tiny_mobile, tiny_stage

import sub8
from sub8.export.artifact import FILENAME, read_header
from sub8.methods.equalize import EqualizeConfig
from sub8.pipeline import pipeline_steps
from sub8.prepare.channel_fold import fold_chains, grid_top
from sub8.prepare.residual_stream import Stream, residual_streams
from sub8.quant.layers import float_mode, quant_layers

# layer -> the convolution whose output it reads through ReLU6 (upper 6) or directly (inf); the
# first expansion's and the second block's input also feed or come from a residual add
CHAINS = {"block1.conv.1.0": ("block1.conv.0.0", 6.0), "block1.conv.2.0": ("block1.conv.1.0", 6.0),
          "block2.conv.1.0": ("block2.conv.0.0", 6.0), "block2.conv.2.0": ("block2.conv.1.0", 6.0),
          "head.0": ("block2.conv.2.0", math.inf)}
DEPTHWISE = {"block1.conv.1.0", "block2.conv.1.0"}


def calib(n=64, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quantized(steps=("ranges", "equalize"), make=tiny_mobile, **settings):
    model, _ = make()
    qm = sub8.quantize(model, calib(), sub8.QuantConfig(cache_dir=None, steps=steps, **settings))
    return model, qm


def observed_input(model, layer_name, x):
    seen = []
    hook = model.get_submodule(layer_name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def test_the_foldable_layers_are_found_and_the_float_model_is_unchanged():
    model, qm = quantized()
    chains = fold_chains(qm.prepared.module)
    assert {n: (c.producer, c.upper) for n, c in chains.items()} == CHAINS
    records = {r["name"]: r for r in qm.report["equalize"]["layers"]}
    assert set(records) == set(CHAINS)
    assert {n for n, r in records.items() if r["kind"] == "depthwise"} == DEPTHWISE
    assert all(r["error"] < r["error_plain"] and r["kept"] for n, r in records.items() if n in DEPTHWISE)
    # a factor is applied only where it lowered the layer's output error
    layers = quant_layers(qm.module)
    assert all((layers[n].smooth is not None) == (r["error"] < r["error_plain"]) == r["kept"] for n, r in records.items())
    x = calib(16, seed=1)
    prepared = qm.prepared
    with torch.no_grad(), float_mode(prepared.module), float_mode(prepared.reference):
        want = model(x)
        assert torch.allclose(prepared(x), want, atol=1e-4 * want.abs().max().item())
        assert torch.allclose(prepared.reference(x), want, atol=1e-4 * want.abs().max().item())


def test_a_layer_whose_factor_is_not_kept_is_left_as_the_ranges_step_set_it():
    # alpha 1 moves a pointwise input's whole range into its weight: some layer then loses
    _, qm = quantized(equalize=EqualizeConfig(alpha=1.0))
    _, plain = quantized(steps=("ranges",))
    layers, before = quant_layers(qm.module), quant_layers(plain.module)
    not_kept = [r["name"] for r in qm.report["equalize"]["layers"] if not r["kept"]]
    assert not_kept
    for n in not_kept:
        assert layers[n].smooth is None and torch.equal(layers[n].layer.weight, before[n].layer.weight)
        for q in ("weight_quantizer", "input_quantizer"):
            got, want = getattr(layers[n], q).state_dict(), getattr(before[n], q).state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want if torch.is_tensor(want[k]))


def test_a_depthwise_input_gets_a_per_channel_grid_and_its_weight_codes_stay():
    model, plain = quantized(steps=("ranges",), ranges="minmax")
    _, qm = quantized(ranges="minmax")
    name = "block2.conv.1.0"
    layer, before = quant_layers(qm.module)[name], quant_layers(plain.module)[name]
    f = layer.smooth
    # f_c = max_k amax_k / amax_c from the float model's own input to the layer (1 where the
    # channel is always zero)
    x = observed_input(model, name, calib())
    amax = x.abs().amax(dim=(0, 2, 3))
    live = amax > 0
    assert 0 < live.sum() < len(amax)
    assert torch.allclose(f[live], amax.max() / amax[live], rtol=1e-5) and torch.all(f[~live] == 1)
    # the per-tensor min-max grid on x * f, divided by f, is x on per-channel min-max grids
    y = observed_input(model, name, calib(8, seed=2))
    got = layer.input_quantizer(y * f.view(1, -1, 1, 1)) / f.view(1, -1, 1, 1)
    step = (torch.where(live, amax, amax.max()) / 255).view(1, -1, 1, 1)  # (ReLU6 outputs: lo = 0)
    want = torch.clamp(torch.round(y / step), 0, 255) * step
    assert ((got - want).abs() <= 1e-4 * step).float().mean() > 0.999
    # the weight's per-channel codes are those of the plain model
    codes = layer.weight_quantizer.codes(layer.layer.weight.detach())
    plain_codes = before.weight_quantizer.codes(before.layer.weight.detach())
    assert (codes == plain_codes).float().mean() > 0.999


def test_a_pointwise_input_gets_smoothquants_factor_within_the_clip():
    model, qm = quantized(equalize={"alpha": 0.5})
    layers = quant_layers(qm.module)
    name = "block1.conv.2.0"  # the projection: reads the depthwise convolution through ReLU6
    x = observed_input(model, name, calib()).double()
    conv = dict(model.named_modules())[name]
    amax = x.abs().amax(dim=(0, 2, 3))
    bn = dict(model.named_modules())["block1.conv.2.1"]  # the weight the layer has after BN folding
    w = (conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)).detach().double()
    w_amax = w.abs().amax(dim=(0, 2, 3))
    live = (amax > 0) & (w_amax > 0)
    assert 0 < live.sum() < len(amax)
    factor = torch.where(live, w_amax.sqrt() / amax.sqrt(), torch.ones_like(amax))  # 1 / s, 1 where dead
    factor = factor.clamp(min=float((amax * factor).max()) / 6.0)
    assert torch.allclose(layers[name].smooth.double(), factor, rtol=1e-4)
    # every factor leaves ReLU6's clip, scaled, at or above the grid's top
    for consumer, (_, upper) in CHAINS.items():
        layer = layers[consumer]
        if layer.smooth is None:
            continue
        assert grid_top(layer) <= upper * float(layer.smooth.min()) * (1 + 1e-6)


@pytest.mark.parametrize("make,convs", [(tiny_mobile, 8), (tiny_stage, 11)])
def test_the_onnx_export_folds_the_factors_and_runs_on_integers(tmp_path, make, convs):
    import onnx
    import onnxruntime as ort

    from sub8.export.onnx_qdq import to_onnx
    _, qm = quantized(steps=("ranges", "equalize", "bias_correction"), make=make)
    onnx_model, _ = to_onnx(qm.module, (1, 3, 32, 32))
    assert not any(n.op_type == "Mul" for n in onnx_model.graph.node)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == convs and not ops["Conv"] and not ops["FusedConv"]
    x = calib(16, seed=3)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(out - ref).max() <= 2e-2 * (ref.max() - ref.min())


def test_the_artifact_keeps_the_factors_and_reads_version_3(tmp_path):
    _, qm = quantized()
    sub8.save(qm, str(tmp_path), "python:tinymodels:tiny_mobile", (1, 3, 32, 32))
    header, _ = read_header(str(tmp_path / FILENAME))
    assert header["version"] == 4 and header["layers"]["block2.conv.1.0"]["smooth"] == 24
    x = calib(8, seed=4)
    with torch.no_grad():
        assert torch.equal(sub8.load(str(tmp_path))(x), qm(x))
    # version 3 wrote `smooth: true` for a Linear's input features only
    _, linear = quantized()
    with torch.no_grad():
        quant_layers(linear.module)["fc"].set_smooth(torch.linspace(0.5, 2.0, 32))
    (tmp_path / "v3").mkdir()
    sub8.save(linear, str(tmp_path / "v3"), "python:tinymodels:tiny_mobile", (1, 3, 32, 32))
    path = tmp_path / "v3" / FILENAME
    tensors, (header, _) = st_load(open(path, "rb").read()), read_header(str(path))
    header["version"] = 3
    header["layers"] = {n: ({**h, "smooth": True} if n == "fc" else {k: v for k, v in h.items() if k != "smooth"})
                        for n, h in header["layers"].items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".input.smooth") or k.startswith("fc.")}
    open(path, "wb").write(st_save(tensors, metadata={"sub8": json.dumps(header)}))
    loaded = sub8.load(str(tmp_path / "v3"))
    assert torch.equal(quant_layers(loaded.module)["fc"].smooth, torch.linspace(0.5, 2.0, 32))


STREAM = Stream(producers=("block0.conv.2.0", "block1.conv.2.0", "block2.conv.2.0"),
                consumers=("block1.conv.0.0", "block2.conv.0.0", "head.0"),
                sites=("block1.conv.0.0", "block2.conv.0.0", "head.0", "requant_add_1", "requant_add_1_1"))


def test_a_residual_stream_is_scaled_as_one_and_the_float_model_is_unchanged():
    model, plain = quantized(steps=("ranges",), make=tiny_stage)
    _, qm = quantized(make=tiny_stage)
    assert residual_streams(qm.prepared.module) == [STREAM]
    assert residual_streams(plain.prepared.module) == [STREAM]
    assert residual_streams(quantized(steps=("ranges",))[1].prepared.module) == []  # a ReLU6 feeds its add
    (record,) = [r for r in qm.report["equalize"]["layers"] if r["kind"] == "stream"]
    assert record["kept"] and record["error"] < record["error_plain"]
    # the factor, recomputed in float64: SmoothQuant's against the readers' BN-folded weights,
    # over every tensor of the stream (the projections' outputs and the adds' outputs)
    seen = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, args, out, n=n: seen.update({n: out.detach().double()}))
        for n in ("block0.conv", "block1.conv", "block1", "block2.conv", "block2")]
    with torch.no_grad():
        model(calib())
    for h in hooks:
        h.remove()
    amax = torch.stack([t.abs().amax(dim=(0, 2, 3)) for t in seen.values()]).amax(0)
    before, after = quant_layers(plain.module), quant_layers(qm.module)
    w = torch.cat([before[n].layer.weight.detach().double().flatten(1) for n in STREAM.consumers])
    factor = w.abs().amax(0).sqrt() / amax.sqrt()
    factor = factor / factor.max()
    for n in STREAM.producers:  # each producer's output channel c times f_c: its row and bias
        smooth = 1 if after[n].smooth is None else after[n].smooth.double()[None]  # (its own input's)
        ratio = after[n].layer.weight.double().flatten(1) * smooth / before[n].layer.weight.double().flatten(1)
        assert torch.allclose(ratio, factor[:, None].expand_as(ratio), rtol=1e-4)
        assert torch.allclose(after[n].layer.bias.double(), before[n].layer.bias.double() * factor, rtol=1e-4)
    for n in STREAM.consumers:  # each reader's input channel c over f_c
        ratio = after[n].layer.weight.double().flatten(1) / before[n].layer.weight.double().flatten(1)
        assert torch.allclose(ratio, 1 / factor[None].expand_as(ratio), rtol=1e-4)
    # the stream's channels are closer to one range, and the float model is unchanged
    spread = amax.max() / amax.min()
    assert (amax * factor).max() / (amax * factor).min() < spread / 4
    x = calib(16, seed=1)
    with torch.no_grad(), float_mode(qm.prepared.module), float_mode(qm.prepared.reference):
        want = model(x)
        for m in (qm.prepared, qm.prepared.reference):
            assert torch.allclose(m(x), want, atol=1e-4 * want.abs().max().item())
    # and the quantized model is closer to float than without the step
    with torch.no_grad():
        err = (qm(x) - want).square().mean()
        assert err < (plain(x) - want).square().mean()


def test_auto_equalizes_models_with_channel_convolutions_at_8_bits():
    model, _ = tiny_mobile()
    assert pipeline_steps(sub8.QuantConfig(), model) == ("ranges", "equalize", "bias_correction")
    assert pipeline_steps(sub8.QuantConfig(w_bits=4, a_bits=4), model) == ("ranges", "adaquant")
    assert pipeline_steps(sub8.QuantConfig()) == ("ranges", "bias_correction")
