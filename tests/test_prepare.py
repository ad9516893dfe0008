import pytest
import torch
from torch import nn

from sub8 import QuantConfig, Sub8Error, prepare
from sub8.prepare import capture, fold_batchnorm
from sub8.quant import float_mode
from tinymodels import ResidualBlock, TinyNet, randomize_bn


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_bn_folding_equals_unfolded_model():
    model = randomize_bn(TinyNet())
    x = torch.randn(4, 3, 32, 32)
    gm = capture(__import__("copy").deepcopy(model))
    folded = fold_batchnorm(gm)
    assert sorted(folded) == ["block.conv1", "block.conv2", "stem.0"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) < 1e-5


def test_prepare_leaves_user_model_untouched_and_float_mode_is_exact():
    model = randomize_bn(TinyNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    p = prepare(model, x[:1], QuantConfig(w_bits=4, a_bits=4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad(), float_mode(p.module):
        assert rel_err(model(x), p.module(x)) < 1e-5


def test_layer_table_kinds_macs_and_producers():
    model = randomize_bn(TinyNet())
    p = prepare(model, torch.randn(1, 3, 32, 32), QuantConfig())
    t = {info.name: info for info in p.layers}
    assert [i.name for i in p.layers] == ["stem.0", "block.conv1", "block.conv2", "dw", "grouped", "fc"]
    assert t["dw"].kind == "depthwise" and t["grouped"].kind == "grouped" and t["fc"].kind == "linear"
    assert t["stem.0"].macs == 16 * 16 * 8 * 3 * 9          # 32x32 input, stride 2
    assert t["grouped"].macs == 16 * 16 * 16 * 4            # 16 outputs of 4 inputs each (groups=2)
    assert t["fc"].macs == 16 * 10 and t["fc"].params == 16 * 10 + 10
    assert t["stem.0"].inputs_from == ["<input>"]
    assert t["block.conv1"].inputs_from == ["stem.0"]
    assert t["dw"].inputs_from == ["block.conv2", "stem.0"]  # through the residual add
    assert t["stem.0"].bn_folded and not t["dw"].bn_folded


def test_followed_by_comes_from_the_graph():
    model = randomize_bn(TinyNet())
    p = prepare(model, torch.randn(1, 3, 32, 32), QuantConfig())
    follow = {i.name: i.followed_by for i in p.layers}
    assert follow == {"stem.0": "relu6", "block.conv1": "relu", "block.conv2": None, "dw": None,
                      "grouped": "relu", "fc": None}


def test_residual_conv_feeding_an_add_is_not_followed_by_relu():
    block = randomize_bn(ResidualBlock(4))
    p = prepare(block, torch.randn(1, 4, 8, 8), QuantConfig())
    follow = {i.name: i.followed_by for i in p.layers}
    # The names would suggest a ReLU after both; the graph says conv2 feeds the add.
    assert follow == {"conv1": "relu", "conv2": None}


def test_first_last_and_pattern_bits():
    model = randomize_bn(TinyNet())
    x = torch.randn(1, 3, 32, 32)
    p = prepare(model, x, QuantConfig(w_bits=4, a_bits=4, first_last_bits="float",
                                      layer_bits={"block.*": (2, 8)}))
    bits = {i.name: (i.w_bits, i.a_bits) for i in p.layers}
    assert bits == {"stem.0": (None, None), "block.conv1": (2, 8), "block.conv2": (2, 8),
                    "dw": (4, 4), "grouped": (4, 4), "fc": (None, None)}
    assert p.quant_layers()["block.conv1"].weight_quantizer.bits == 2
    with pytest.raises(Sub8Error, match="match no layer"):
        prepare(model, x, QuantConfig(layer_bits={"nope.*": (4, 4)}))


def test_untraceable_model_is_prepared_without_a_graph_and_says_so():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            x = self.conv(x).mean((2, 3))
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return -self.fc(x)

    model = Dynamic().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, x, QuantConfig())
    assert prepared.capture["path"] == "modules" and "torch.fx" in prepared.capture["reason"]
    assert [i.name for i in prepared.layers] == ["conv", "fc"]
    assert prepared.coverage["macs"]["share"] == 1.0 and prepared.coverage["float"] == []
    with float_mode(prepared.module):
        assert torch.allclose(prepared(x), model(x), atol=1e-6)


@pytest.mark.slow
def test_mobilenet_v2_table_and_exact_folding():
    from sub8.zoo import load_model
    m = load_model("zoo:mobilenet_v2").module
    x = torch.randn(2, 3, 224, 224)
    p = prepare(m, x[:1], QuantConfig(w_bits=8, a_bits=8))
    assert len(p.layers) == 53 and sum(i.bn_folded for i in p.layers) == 52
    with torch.no_grad(), float_mode(p.module):
        assert rel_err(m(x), p.module(x)) < 1e-5
    follow = {i.name: i.followed_by for i in p.layers}
    assert follow["features.0.0"] == "relu6"
    assert follow["features.2.conv.0.0"] == "relu6"   # expand conv
    assert follow["features.2.conv.1.0"] == "relu6"   # depthwise
    assert follow["features.2.conv.2"] is None        # linear bottleneck
    assert follow["features.3.conv.2"] is None        # feeds the residual add
    assert follow["classifier.1"] is None
    assert sum(f == "relu6" for f in follow.values()) == 35
    assert sum(i.kind == "depthwise" for i in p.layers) == 17
    assert sum(i.macs for i in p.layers) == pytest.approx(300.8e6, rel=0.01)  # MobileNetV2: ~300M MACs


def test_optional_forward_arguments_are_fixed_at_their_defaults():
    class Optional(nn.Module):  # like timm's ViT: forward(x, attn_mask=None, is_causal=False)
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, mask=None, flip=False):
            y = self.fc1(x)
            if mask is not None:
                y = y * mask
            return self.fc2(-y if flip else y)

    model = Optional().eval()
    gm = capture(model)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
