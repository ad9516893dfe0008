"""SmoothQuant: the float model is unchanged, the factor is the paper's, the outliers leave the
activation grid, and every path that reads a layer's input sees the smoothed one."""

import numpy as np
import pytest
import torch
from tinymodels import OutlierTokens, TinyViT, outlier_tokens, tiny

import sub8
from sub8.calibrate.adaquant import capture_inputs, reconstruction_mse
from sub8.calibrate.variables import StepVariable, VariableLayer
from sub8.pipeline import pipeline_steps
from sub8.quant.layers import float_mode, module_state, quant_layers

W8A8 = dict(w_bits=8, a_bits=8, requantize=False, cache_dir=None)


def calib_tokens(n=64, seed=0):
    return torch.randn(n, 6, 8, generator=torch.Generator().manual_seed(seed))


def smoothed(steps=("ranges", "smooth_quant"), **settings):
    model = outlier_tokens()
    qm = sub8.quantize(model, calib_tokens(), sub8.QuantConfig(**{**W8A8, **settings}, steps=steps))
    return model, qm


def test_smoothing_leaves_the_float_model_unchanged_and_is_the_papers_factor():
    model, qm = smoothed()
    x = calib_tokens(16, seed=1)
    prepared = qm.prepared
    with torch.no_grad(), float_mode(prepared.module), float_mode(prepared.reference):
        want = model(x)
        assert torch.allclose(prepared(x), want, atol=1e-5)
        assert torch.allclose(prepared.reference(x), want, atol=1e-5)
    # s_j = max|X_j|^a / max|W_:,j|^(1 - a), in float64 from the float model's own tensors
    h = []
    hook = model.up.register_forward_hook(lambda m, args, out: h.append(args[0].detach()))
    with torch.no_grad():
        model(calib_tokens())
    hook.remove()
    x_amax = torch.cat(h).double().reshape(-1, 16).abs().amax(0)
    w_amax = model.up.weight.detach().double().abs().amax(0)
    s = x_amax ** 0.95 / w_amax ** 0.05
    up = quant_layers(prepared.module)["up"]
    assert torch.allclose(up.smooth.double(), 1 / s, rtol=1e-5)
    assert torch.allclose(up.layer.weight.double(), model.up.weight.double() * s, rtol=1e-5)
    record = {r["name"]: r for r in qm.report["smooth_quant"]["layers"]}
    assert set(record) == {"embed", "up", "down", "head"} and qm.report["smooth_quant"]["alpha"] == 0.95
    # the two outlier features stood ~40x above the median; the product's error falls with them gone
    assert record["up"]["input_amax_ratio"] > 20 and record["up"]["error"] < 0.5 * record["up"]["error_plain"]


def test_the_activation_grid_loses_the_outliers_and_the_output_error_falls():
    model, plain = smoothed(steps=("ranges",))
    _, smooth = smoothed()
    before = quant_layers(plain.prepared.module)["up"].input_quantizer.step.item()
    after = quant_layers(smooth.prepared.module)["up"].input_quantizer.step.item()
    assert after < 0.25 * before, (before, after)
    x = calib_tokens(128, seed=2)
    with torch.no_grad():
        want = model(x)
        errors = [(q(x) - want).square().mean().item() for q in (plain, smooth)]
    assert errors[1] < 0.7 * errors[0], errors


def test_a_layer_whose_input_has_more_bits_than_its_weight_keeps_its_input():
    _, qm = smoothed(w_bits=4, a_bits=8, first_last_bits=8)
    names = {r["name"] for r in qm.report["smooth_quant"]["layers"]}
    assert names == {"embed", "head"}  # the first and last layers: W8A8; up and down: W4A8
    assert all(quant_layers(qm.prepared.module)[n].smooth is None for n in ("up", "down"))


def test_a_layer_whose_input_quantizer_a_junction_shares_keeps_its_input():
    """With requantized junctions, `up`'s input quantizer also quantizes the residual add's input
    `h`: scaling it for `up` alone would put `h` on the wrong grid."""
    _, qm = smoothed(requantize=True)
    names = {r["name"] for r in qm.report["smooth_quant"]["layers"]}
    assert "up" not in names and {"embed", "down"} <= names
    assert quant_layers(qm.prepared.module)["up"].smooth is None


def test_every_reader_of_a_smoothed_layers_input_agrees_with_its_forward():
    """AdaQuant's caches hold the observed (smoothed) inputs; its stand-in in block reconstruction
    and GPTQ's graph pass get the raw ones: each path gives the layer's own output."""
    _, qm = smoothed()
    prepared = qm.prepared
    up = quant_layers(prepared.module)["up"]
    raw = []
    hook = up.register_forward_pre_hook(lambda m, args: raw.append(args[0].detach()))
    calib = calib_tokens(8)
    observed = capture_inputs(prepared.module, ["up"], calib, 8, torch.float32, float_model=False)["up"]
    with torch.no_grad():
        prepared(calib)
    hook.remove()
    raw = raw[-1]
    with torch.no_grad():
        out = up(raw)
        assert torch.allclose(up.compute(observed.reshape(raw.shape)), out, atol=1e-6)
        stand_in = VariableLayer(up, None, StepVariable(up.input_quantizer, 0.1))
        assert torch.allclose(stand_in(raw), out, atol=1e-6)
    assert reconstruction_mse(up, observed.reshape(raw.shape), out, lambda t: t, 8) < 1e-12



def test_gptq_accumulates_the_hessian_of_the_smoothed_input(monkeypatch):
    from sub8.methods import gptq
    seen = {}
    accumulate = gptq.HessianAccumulator.__call__

    def spy(self, site, x):
        seen.setdefault(id(self.layer), []).append(x.detach().clone())
        return accumulate(self, site, x)

    monkeypatch.setattr(gptq.HessianAccumulator, "__call__", spy)
    _, qm = smoothed(steps=("ranges", "smooth_quant", "gptq"), w_bits=4, a_bits=4)
    monkeypatch.setattr(gptq.HessianAccumulator, "__call__", accumulate)
    up = quant_layers(qm.prepared.module)["up"]
    # what GPTQ saw is the float model's smoothed input when the model before `up` is float
    h = []
    hook = qm.prepared.reference.get_submodule("up").register_forward_pre_hook(lambda m, args: h.append(args[0]))
    with torch.no_grad(), float_mode(qm.prepared.reference):
        qm.prepared.reference(calib_tokens())
    hook.remove()
    got = torch.cat([x.reshape(-1, 16) for x in seen[id(up)]])
    want = h[0].reshape(-1, 16) * up.smooth
    # (the layers before `up` are quantized in sequential GPTQ: close, not equal)
    assert got.abs().amax(0).max() < 0.2 * h[0].abs().amax(), "the outlier features reached GPTQ"
    assert torch.allclose(got.abs().amax(0), want.abs().amax(0), rtol=0.1, atol=0.05)


def test_a_loaded_state_brings_its_smoothing_to_the_float_reference():
    model, qm = smoothed()
    fresh = sub8.prepare(model, calib_tokens(1), sub8.QuantConfig(**W8A8))
    assert quant_layers(fresh.module)["up"].smooth is None
    fresh.module.load_state_dict(module_state(qm.prepared.module))
    fresh.sync_bits()
    x = calib_tokens(8, seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(x), qm(x))
        with float_mode(fresh.reference):
            assert torch.allclose(fresh.reference(x), model(x), atol=1e-5)
    ref_up = quant_layers(fresh.reference)["up"]
    assert torch.equal(ref_up.smooth, quant_layers(qm.prepared.module)["up"].smooth)


def test_artifact_and_onnx_keep_the_smoothing(tmp_path):
    from safetensors.torch import load as st_load

    from sub8.export.artifact import FILENAME, read_header
    from sub8.export.onnx_qdq import to_onnx
    _, qm = smoothed(steps=("ranges", "smooth_quant", "bias_correction"))
    sub8.save(qm, str(tmp_path), "python:tinymodels:outlier_tokens", (1, 6, 8))
    header, _ = read_header(str(tmp_path / FILENAME))
    assert header["version"] == 4 and header["layers"]["up"]["smooth"] == 16
    assert st_load(open(tmp_path / FILENAME, "rb").read())["up.input.smooth"].shape == (16,)
    loaded = sub8.load(str(tmp_path))
    x = calib_tokens(8, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    import onnxruntime as ort
    onnx_model, _ = to_onnx(qm.module, (1, 6, 8))
    assert sum(n.op_type == "Mul" and "_smoothed" in n.name for n in onnx_model.graph.node) == 4
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(out - ref).max() <= 1e-2 * (ref.max() - ref.min())


def test_auto_smooths_in_models_with_attention_only():
    vit, cnn = TinyViT().eval(), tiny()[0]
    assert pipeline_steps(sub8.QuantConfig(), vit) == ("ranges", "smooth_quant", "bias_correction")
    assert pipeline_steps(sub8.QuantConfig(w_bits=4, a_bits=4), vit) == ("ranges", "smooth_quant", "adaquant")
    for model, w8a8 in ((cnn, ("ranges", "equalize", "bias_correction")),  # no attention: no smoothing
                        (OutlierTokens(), ("ranges", "bias_correction"))):
        assert pipeline_steps(sub8.QuantConfig(), model) == w8a8
        assert pipeline_steps(sub8.QuantConfig(w_bits=4, a_bits=4), model) == ("ranges", "adaquant")
    with pytest.raises(sub8.Sub8Error, match=r"smooth_quant.alpha must be in \[0, 1\]"):
        sub8.QuantConfig(smooth_quant={"alpha": 1.5})


def test_smoothing_twice_keeps_the_float_model_and_composes_the_factors():
    model, qm = smoothed(steps=("ranges", "smooth_quant", "smooth_quant"))
    x = calib_tokens(16, seed=6)
    with torch.no_grad(), float_mode(qm.prepared.module):
        assert torch.allclose(qm.prepared(x), model(x), atol=1e-4)
    up = quant_layers(qm.prepared.module)["up"]
    assert torch.allclose(up.layer.weight * up.smooth, model.up.weight, rtol=1e-4, atol=1e-6)


def test_a_vision_transformer_by_default_smooths_its_projections_and_keeps_its_float_model():
    """TinyViT (nn.MultiheadAttention, spelled out into four Linears) under the auto pipeline: at
    W8A8 the MLP's first Linear reads the residual stream that a requantized junction shares, so
    it keeps its input; at W4A4 (no junctions) it is smoothed too."""
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.rand(32, 3, 32, 32)
    for bits, first_mlp in ((8, False), (4, True)):
        qm = sub8.quantize(model, x, sub8.QuantConfig(w_bits=bits, a_bits=bits, cache_dir=None,
                                                      adaquant={"iters": 2}))
        names = {r["name"] for r in qm.report["smooth_quant"]["layers"]}
        assert {f"blocks.{b}.attn.{p}_proj" for b in (0, 1) for p in ("q", "k", "v", "out")} <= names
        assert ("blocks.0.mlp.0" in names) == first_mlp
        with torch.no_grad(), float_mode(qm.prepared.reference):
            assert torch.allclose(qm.prepared.reference(x), model(x), atol=1e-5)
