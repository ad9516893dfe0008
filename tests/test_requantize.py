"""Requantized junctions (prepare/requantize.py): residual adds' and the final pool's inputs."""

import collections
import operator

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import sub8
from sub8.cli import main
from sub8.prepare.requantize import QuantTensor
from tinymodels import tiny


def _tiny_quantized(**settings):
    model, _ = tiny()
    calib = torch.randn(32, 3, 32, 32)
    return sub8.quantize(model, calib, sub8.QuantConfig(**{"pipeline": "rtn", "cache_dir": None, **settings}))


def _own_quantizers(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantTensor)}


def test_the_skip_shares_the_layer_quantizer_and_the_block_output_and_pool_input_get_their_own():
    qm = _tiny_quantized()
    gm = qm.module
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add)
    targets = [a.target for a in add.args]
    # the skip (the stem's output) is read by block.conv1: its quantizer, the very same module
    assert "block.conv1.input_quantizer" in targets
    other = gm.get_submodule(next(t for t in targets if t != "block.conv1.input_quantizer"))
    assert isinstance(other, QuantTensor)
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "pool")
    assert isinstance(gm.get_submodule(pool.args[0].target), QuantTensor)
    assert len(_own_quantizers(gm)) == 2
    assert qm.report["junctions"] == {"requantized": 3, "own_quantizers": 2, "bits": 8}
    for q in _own_quantizers(gm).values():
        assert q.input_quantizer.initialized  # calibrated by the ranges step like any input


def test_the_requantized_model_computes_what_its_quantizers_say():
    """The graph against the block written out by hand with the same modules."""
    qm = _tiny_quantized()
    m = qm.module
    own = _own_quantizers(m)
    block_out = next(q for name, q in own.items() if "add" in name)
    pool_in = next(q for name, q in own.items() if "pool" in name)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        s = F.relu6(m.get_submodule("stem.0")(x))
        y = m.get_submodule("block.conv2")(F.relu(m.get_submodule("block.conv1")(s)))
        z = F.relu(block_out(y) + m.get_submodule("block.conv1.input_quantizer")(s))
        z = torch.relu(m.get_submodule("grouped")(m.get_submodule("dw")(z)))
        expected = m.get_submodule("fc")(torch.flatten(F.adaptive_avg_pool2d(pool_in(z), 1), 1))
        assert torch.equal(m(x), expected)
        # and the junction quantizers do move values: without them the output differs
        with_float_junctions = m.get_submodule("fc")(torch.flatten(F.adaptive_avg_pool2d(
            torch.relu(m.get_submodule("grouped")(m.get_submodule("dw")(F.relu(y + s)))), 1), 1))
        assert not torch.equal(m(x), with_float_junctions)


class Adds(nn.Module):
    """Three adds, one of them a junction: a broadcast parameter and a constant are not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x) + self.pos
        h = h + 1
        return self.out(h + x)


def test_only_adds_of_two_activations_are_junctions():
    qm = sub8.quantize(Adds(), torch.randn(16, 4), sub8.QuantConfig(pipeline="rtn", cache_dir=None))
    adds = [n for n in qm.module.graph.nodes if n.op == "call_function" and n.target is operator.add]
    quantizers = (sub8.quant.quantizer.Quantizer, QuantTensor)
    quantized = [[isinstance(a, torch.fx.Node) and a.op == "call_module"
                  and isinstance(qm.module.get_submodule(a.target), quantizers) for a in n.args] for n in adds]
    assert quantized == [[False, False], [False, False], [True, True]]
    assert adds[2].args[1].target == "fc.input_quantizer"  # x is read by fc: its quantizer


@pytest.mark.parametrize("settings, own", [({}, 2), (dict(w_bits=4), 0), (dict(a_bits=4, w_bits=4), 0),
                                           (dict(requantize=False), 0), (dict(a_bits=4, w_bits=4, requantize=True), 2),
                                           (dict(pipeline="light", allocation={"size_ratio": 0.5}), 0)])
def test_requantize_is_on_when_every_layer_is_w8a8_unless_asked(settings, own):
    qm = _tiny_quantized(**settings)
    assert len(_own_quantizers(qm.module)) == own
    assert qm.report["config"]["requantize"] is (own > 0)  # resolved in the report
    bits = [q.input_quantizer.bits for q in _own_quantizers(qm.module).values()]
    assert bits == [qm.module.get_submodule("block.conv1").a_bits] * own


def test_configs_written_before_requantize_load_without_it():
    record = sub8.QuantConfig().to_dict()
    assert record["version"] == 3 and record["requantize"] is None
    old = {k: v for k, v in record.items() if k != "requantize"}
    assert sub8.QuantConfig.from_dict({**old, "version": 2}).requantize is False
    assert sub8.QuantConfig.from_dict(record).requantize is None


def test_cli_no_requantize(image_dirs, tmp_path):
    import json
    calib, _ = image_dirs
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                       "--pipeline", "rtn", "--no-requantize", "--no-cache", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.load(open(out / "report.json"))
    assert report["config"]["requantize"] is False
    assert report["junctions"]["requantized"] == 0


def _optimized_ops(onnx_model, tmp_path):
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_onnx_runtime_runs_the_default_w8a8_export_on_integers(tmp_path):
    """Every convolution fuses into QLinearConv and the residual add into QLinearAdd; the float
    ops left are the pool's and the classifier's bias."""
    from sub8.export.onnx_qdq import to_onnx
    model, _ = tiny()
    calib = torch.randn(32, 3, 32, 32)
    qm = sub8.quantize(model, calib, sub8.QuantConfig(cache_dir=None))
    onnx_model, _ = to_onnx(qm.module, (1, 3, 32, 32))
    ops = _optimized_ops(onnx_model, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    assert not ops["Conv"] and not ops["FusedConv"] and not ops["Gemm"] and not ops["MatMul"]
    # without requantized junctions the block's last convolution stays float
    qm = sub8.quantize(model, calib, sub8.QuantConfig(cache_dir=None, requantize=False))
    ops = _optimized_ops(to_onnx(qm.module, (1, 3, 32, 32))[0], tmp_path)
    assert ops["QLinearConv"] < 5 and ops["QLinearAdd"] == 0


def test_the_artifact_rebuilds_the_junction_quantizers_bit_for_bit(tmp_path):
    qm = _tiny_quantized(pipeline="auto")
    assert _own_quantizers(qm.module)
    sub8.save(qm, str(tmp_path), "python:tinymodels:tiny", (1, 3, 32, 32))
    loaded = sub8.load(str(tmp_path))
    assert set(_own_quantizers(loaded.module)) == set(_own_quantizers(qm.module))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
