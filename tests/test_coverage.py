"""Any model a user brings: what stays float is named (coverage, --strict), wrapped layers keep
their attributes, nn.MultiheadAttention is quantized whole, and models that torch.fx cannot
trace are prepared without a graph."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sub8 import QuantConfig, Sub8Error, prepare
from sub8.prepare.attention import ExplicitMultiheadAttention
from sub8.prepare.blocks import find_units
from sub8.quant import float_mode
from sub8.quant.layers import QuantLayer
from tinymodels import SdpaAttention, TinyViT, Tokens, WindowAttention


class ReadsOwnWeight(nn.Module):
    """Reads its conv's attributes, as many models do (e.g. to size a later tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x) * self.conv.weight.new_ones(self.conv.out_channels)[None, :, None, None]
        return self.fc(y.mean((2, 3)))


class FunctionalLinear(nn.Module):
    """Calls F.linear with its own Linear's weight, as torchvision's Swin does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = F.linear(self.stem(x).relu(), self.proj.weight, self.proj.bias)
        return self.head(x)


class WithConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.conv1d = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv1d(self.fc(x)[:, None, :])
        return self.head(x.flatten(1))


def test_wrapped_layer_keeps_the_attributes_of_the_layer_it_wraps():
    model = ReadsOwnWeight().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, x, QuantConfig())
    conv = prepared.module.get_submodule("conv")
    assert isinstance(conv, QuantLayer)
    assert conv.weight is conv.layer.weight and conv.out_channels == 8 and conv.kernel_size == (3, 3)
    with pytest.raises(AttributeError):
        conv.no_such_attribute
    with float_mode(prepared.module):
        assert torch.allclose(prepared(x), model(x), atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_attention_equals_nn_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).double().eval()
    explicit = ExplicitMultiheadAttention(mha, None, False).eval()
    b, tgt, src = 3, 5, 7
    q, k, v = torch.randn(b, tgt, 16).double(), torch.randn(b, src, 12).double(), torch.randn(b, src, 12).double()
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.rand(b, src) < 0.3
    padding[:, 0] = False
    masks = [{}, {"key_padding_mask": padding}, {"attn_mask": torch.rand(tgt, src) < 0.3},
             {"attn_mask": torch.randn(b * 4, tgt, src).double()}, {"need_weights": False},
             {"average_attn_weights": False}]
    masks[2]["attn_mask"][:, 0] = False
    for kwargs in masks:
        want, got = mha(q, k, v, **kwargs), explicit(q, k, v, **kwargs)
        assert torch.allclose(want[0], got[0], atol=1e-12), kwargs
        assert (want[1] is None) == (got[1] is None)
        if want[1] is not None:
            assert torch.allclose(want[1], got[1], atol=1e-12), kwargs


def test_multihead_attention_is_quantized_whole():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    prepared = prepare(model, x, QuantConfig(w_bits=4, a_bits=8))
    names = [i.name for i in prepared.layers]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"blocks.0.attn.{proj}" in names and f"blocks.1.attn.{proj}" in names
    assert prepared.capture["path"] == "fx"
    coverage = prepared.coverage
    assert coverage["float"] == [] and coverage["macs"]["share"] == 1.0
    assert coverage["products"] == {**coverage["products"], "quantized": 4, "float": 0}
    assert prepared.attention_modules == 2
    with float_mode(prepared.module):  # the float model after the rewrite is the user's model
        assert torch.allclose(prepared(x), model(x), atol=1e-5)
    units = find_units(prepared.module, prepared.layers)
    assert [u.name for u in units if u.kind == "block"] == ["blocks.0", "blocks.1"]
    assert units[1].layers == [f"blocks.0.{n}" for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                       "attn.out_proj", "mlp.0", "mlp.2")]


def test_attention_products_stay_float_without_attention_quantization_and_coverage_says_so():
    prepared = prepare(TinyViT().eval(), torch.randn(1, 3, 16, 16), QuantConfig(quantize_attention=False))
    products = prepared.coverage["products"]
    assert products["quantized"] == 0 and products["float"] == 4
    left = [e for e in prepared.coverage["float"] if e["op"] == "torch.matmul"]
    assert len(left) == 2 and all("attention" in e["reason"] and e["chosen"] for e in left)
    assert {e["where"] for e in left} == {"blocks.0.attn", "blocks.1.attn"}


@pytest.mark.parametrize("traced", [True, False])
def test_a_weight_handed_to_f_linear_is_quantized_as_a_layer(traced):
    model = FunctionalLinear().eval()
    model.sub8_traceable = traced  # False: prepared without a graph, the call redirected at run time
    x = torch.randn(4, 6)
    prepared = prepare(model, x, QuantConfig(w_bits=4, a_bits=8, first_last_bits=8))
    assert prepared.capture["path"] == ("fx" if traced else "modules")
    layers = {i.name: i for i in prepared.layers}
    assert list(layers) == ["stem", "proj", "head"] and layers["proj"].macs == 16 * 16
    assert layers["proj"].w_bits == 4
    assert prepared.coverage["float"] == [] and prepared.coverage["macs"]["share"] == 1.0
    with float_mode(prepared.module):
        assert torch.allclose(prepared(x), model(x), atol=1e-6)
    # the layer quantizes: with a calibrated 4-bit grid the output moves off the float one
    from sub8.calibrate.ranges import calibrate_ranges
    calibrate_ranges(prepared, torch.randn(32, 6))
    seen = []
    prepared.quant_layers()["proj"].observer = lambda layer, inp: seen.append(inp.shape)
    out = prepared(x)
    assert seen == [torch.Size([4, 16])] and not torch.allclose(out, model(x), atol=1e-4)


def test_coverage_names_an_unsupported_layer_kind_and_strict_refuses_it():
    x = torch.randn(2, 8)
    prepared = prepare(WithConv1d().eval(), x, QuantConfig())
    (left,) = prepared.coverage["float"]
    assert left["weights"] == ["conv1d.weight"] and "nn.Conv1d" in left["reason"]
    assert left["params_share"] == pytest.approx(6 / sum(p.numel() for p in prepared.reference.parameters()
                                                        if p.dim() > 0) , rel=0.2)
    with pytest.raises(Sub8Error, match="conv1d"):
        prepare(WithConv1d().eval(), x, QuantConfig(strict=True))


def test_layers_kept_float_on_request_are_listed_but_not_refused():
    prepared = prepare(TinyViT().eval(), torch.randn(1, 3, 16, 16), QuantConfig(first_last_bits=None, strict=True))
    chosen = [e for e in prepared.coverage["float"] if e["chosen"]]
    assert {e["weights"][0] for e in chosen} == {"patch.layer.weight", "head.layer.weight"}


@pytest.mark.parametrize("attention,traced", [(SdpaAttention(fused=True), True), (SdpaAttention(fused=False), True),
                                              (SdpaAttention(fused=True), False), (SdpaAttention(fused=False), False),
                                              (WindowAttention(), True)],
                         ids=["sdpa-fx", "matmul-fx", "sdpa-no-graph", "matmul-no-graph", "opaque-function-fx"])
def test_attention_products_and_functional_weights_are_quantized_in_vision_models(attention, traced):
    model = Tokens(attention).eval()
    model.sub8_traceable = traced
    x = torch.randn(2, 5, 8)
    prepared = prepare(model, x, QuantConfig(w_bits=4, a_bits=4))
    assert prepared.capture["path"] == ("fx" if traced else "modules")
    coverage = prepared.coverage
    assert coverage["float"] == [] and coverage["macs"]["share"] == 1.0
    assert coverage["products"]["float"] == 0 and coverage["products"]["quantized"] in (1, 2)
    weights = {i.name.rsplit(".", 1)[-1] for i in prepared.layers}
    assert {"qkv", "proj"} <= weights and len(prepared.layers) == 4
    with float_mode(prepared.module):
        assert torch.allclose(prepared(x), model(x), atol=1e-5)
    sites = [n for n, m in prepared.module.named_modules() if type(m).__name__ == "QuantInput"]
    assert len(sites) in (3, 4)  # q, k, (probs,) v: a fused or spelled-out softmax
    names = [n for n, _ in prepared.module.named_parameters() if n.endswith("qkv.weight") or n.endswith("qkv.layer.weight")]
    assert len(names) == 1  # the weight lives in one place


def test_a_product_site_count_that_changes_with_the_input_is_an_error():
    class Varying(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            for _ in range(int(x.shape[1])):  # more products for longer inputs
                y = (y @ y.transpose(-2, -1)).softmax(-1) @ y
            return y

    model = Varying().eval()
    model.sub8_traceable = False
    prepared = prepare(model, torch.randn(1, 2, 4), QuantConfig(a_bits=8))
    from sub8.calibrate.ranges import calibrate_ranges
    calibrate_ranges(prepared, torch.randn(4, 2, 4))
    prepared(torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="more matrix products than when sub8 prepared it"):
        prepared(torch.randn(1, 3, 4))


def test_every_attention_form_saves_and_loads_bit_for_bit(tmp_path):
    import sub8
    from tinymodels import all_attentions
    model, _ = all_attentions()
    calib, x = torch.randn(16, 3, 16, 16), torch.randn(4, 3, 16, 16)
    q = sub8.quantize(model, calib, QuantConfig(w_bits=4, a_bits=8, pipeline="rtn", cache_dir=None))
    coverage = q.report["coverage"]
    assert coverage["float"] == [] and coverage["products"] == {**coverage["products"], "quantized": 8, "float": 0}
    sub8.save(q, str(tmp_path), "python:tinymodels:all_attentions", (1, 3, 16, 16))
    loaded = sub8.load(str(tmp_path))
    assert [i.name for i in loaded.prepared.layers] == [i.name for i in q.prepared.layers]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    with pytest.raises(Sub8Error, match="ONNX export"):  # refused by name, never exported in part
        from sub8.export.onnx_qdq import to_onnx
        to_onnx(q.module, (1, 3, 16, 16))


def test_without_attention_quantization_products_stay_float_everywhere_and_are_listed():
    from tinymodels import all_attentions
    model, _ = all_attentions()
    x = torch.randn(2, 3, 16, 16)
    prepared = prepare(model, x, QuantConfig(quantize_attention=False, strict=True))  # asked for: no error
    products = prepared.coverage["products"]
    assert all(e["chosen"] and "--no-attention" in e["reason"] for e in prepared.coverage["float"])
    assert products["quantized"] == 0 and products["float"] == 7  # SDPA counted once, fused
    assert [n for n, m in prepared.module.named_modules() if type(m).__name__ == "QuantInput"] == []
    with float_mode(prepared.module):
        assert torch.allclose(prepared(x), model(x), atol=1e-5)


def test_cli_summary_names_what_stays_float_and_strict_refuses_it(image_dirs, tmp_path):
    import json

    from click.testing import CliRunner

    from sub8.cli import main
    calib, _ = image_dirs
    args = ["quantize", "--model", "python:tinymodels:tiny_with_conv1d", "--calib", calib, "--pipeline", "rtn"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "float: conv1d F.conv1d conv1d.weight" in result.output and "nn.Conv1d is not a layer kind" in result.output
    coverage = json.load(open(tmp_path / "run" / "report.json"))["coverage"]
    assert [e["weights"] for e in coverage["float"]] == [["conv1d.weight"]] and coverage["macs"]["share"] < 1
    result = CliRunner().invoke(main, [*args, "--strict", "--out", str(tmp_path / "strict")])
    assert result.exit_code == 2 and "--strict: 1 weight-bearing operation(s) would stay in float" in result.output
    assert not (tmp_path / "strict" / "report.json").exists()


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_hf_image_classifier_checkpoint_is_quantized_whole(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    import sub8
    from sub8.zoo import load_model
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=5))
    else:
        model = transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5))
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    x = torch.randn(4, 3, 32, 32)
    q = sub8.quantize(loaded.module, x, QuantConfig(steps=("ranges",), cache_dir=None))
    coverage = q.report["coverage"]
    assert q.report["capture"]["path"] == "modules"  # transformers' models do not trace with torch.fx
    assert coverage["float"] == [] and coverage["macs"]["share"] == 1.0
    assert coverage["products"]["quantized"] == 4 and coverage["products"]["float"] == 0
    with float_mode(q.module), torch.no_grad():
        assert torch.allclose(q.module(x), loaded.module(x), atol=1e-5)
