"""The packed artifact (model.safetensors) and the ONNX QDQ export."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import sub8
from sub8.cli import main
from sub8.export.artifact import FILENAME, read_header
from sub8.export.pack import pack, packed_bytes, unpack
from tinymodels import randomize_bn, tiny

MIXED_BITS = {"stem.0": (8, 8), "block.conv1": (3, 5), "block.conv2": (2, 4), "dw": (4, 4),
              "grouped": (6, 7), "fc": (8, 8)}


# -- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trips_every_width_and_odd_sizes(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 3, 7, 8, 13, 1001):
        codes = rng.integers(0, 2 ** bits, count)
        packed = pack(codes, bits)
        assert packed.dtype == np.uint8 and packed.size == packed_bytes(count, bits) == (count * bits + 7) // 8
        assert np.array_equal(unpack(packed, bits, count), codes)


def test_pack_layout_is_little_endian_bit_stream():
    assert pack(np.array([1, 2]), 4).tolist() == [0x21]            # first code in the low nibble
    assert pack(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit codes 7, 0, 5: bits 111 000 101 -> byte 0 = 0b01000111, byte 1 = 0b1
    assert pack(np.array([7, 0, 5]), 3).tolist() == [0b01000111, 0b1]
    with pytest.raises(sub8.Sub8Error, match="outside"):
        pack(np.array([16]), 4)
    with pytest.raises(sub8.Sub8Error, match="bytes"):
        unpack(np.zeros(3, np.uint8), 4, 7)


# -- the artifact -------------------------------------------------------------------------------
def _quantized(w_symmetric=False):
    model, transform = tiny()
    randomize_bn(model)
    calib = torch.randn(16, 3, 32, 32)
    config = sub8.QuantConfig(layer_bits=MIXED_BITS, w_symmetric=w_symmetric, pipeline="rtn")
    return sub8.quantize(model, calib, config), torch.randn(6, 3, 32, 32), transform


@pytest.mark.parametrize("w_symmetric", [False, True])
def test_save_load_gives_identical_outputs(tmp_path, w_symmetric):
    qm, x, _ = _quantized(w_symmetric)
    sub8.save(qm, str(tmp_path), "python:tinymodels:tiny", (1, 3, 32, 32))
    loaded = sub8.load(str(tmp_path))
    bits = {i.name: (i.w_bits, i.a_bits) for i in loaded.prepared.layers}
    assert bits == MIXED_BITS
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    tensors = st_load(open(tmp_path / FILENAME, "rb").read())
    # 3-bit codes of 8x8x3x3 weights take 72 bytes; 6-bit codes of a 16x4x1x1 weight 48 bytes.
    assert tensors["block.conv1.weight.codes"].numel() == 8 * 8 * 9 * 3 // 8
    assert tensors["grouped.weight.codes"].numel() == 16 * 4 * 6 // 8
    assert ("block.conv1.weight.zero_point" in tensors) != w_symmetric


def _tamper(path, change_header=None, change_tensors=None, raw=None):
    tensors = st_load(open(path, "rb").read())
    header, _ = read_header(path)
    if change_header:
        change_header(header)
    if change_tensors:
        change_tensors(tensors)
    data = st_save(tensors, metadata={"sub8": json.dumps(header)}) if raw is None else raw
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("damage, message", [
    (dict(change_header=lambda h: h.update(version=99)), "format version 99"),
    (dict(change_header=lambda h: h.update(format="something")), "not a sub8 artifact"),
    (dict(change_header=lambda h: h["layers"]["dw"].update(weight_shape=[8, 1, 5, 5])), "weight shape"),
    (dict(change_header=lambda h: h["layers"]["dw"]["weight"].update(bits=9)), "9 bits"),
    (dict(change_header=lambda h: h["layers"].pop("fc")), "layers fc differ"),
    (dict(change_tensors=lambda t: t.update({"dw.weight.step": torch.ones(7)})), "expected torch.float32 \\(8,\\)"),
    (dict(change_tensors=lambda t: t.pop("fc.bias")), "lacks the tensor 'fc.bias'"),
    (dict(change_tensors=lambda t: t.update(extra=torch.ones(1))), "tensors the model does not"),
    (dict(raw=b"\x10\x00"), "truncated"),
])
def test_damaged_artifacts_are_refused(tmp_path, damage, message):
    qm, _, _ = _quantized()
    sub8.save(qm, str(tmp_path), "python:tinymodels:tiny", (1, 3, 32, 32))
    _tamper(tmp_path / FILENAME, **damage)
    with pytest.raises(sub8.Sub8Error, match=message):
        sub8.load(str(tmp_path))


def test_truncated_tensor_data_is_refused(tmp_path):
    qm, _, _ = _quantized()
    sub8.save(qm, str(tmp_path), "python:tinymodels:tiny", (1, 3, 32, 32))
    data = (tmp_path / FILENAME).read_bytes()
    (tmp_path / FILENAME).write_bytes(data[:-100])
    with pytest.raises(sub8.Sub8Error, match="damaged"):
        sub8.load(str(tmp_path))


# -- ONNX ---------------------------------------------------------------------------------------
def _onnx_outputs(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("layer_bits, w_symmetric", [({}, False), ({}, True), (MIXED_BITS, False)])
def test_onnx_runtime_matches_sub8_on_a_small_model(layer_bits, w_symmetric):
    from sub8.export.onnx_qdq import to_onnx
    model, _ = tiny()
    randomize_bn(model)
    calib = torch.randn(32, 3, 32, 32)
    qm = sub8.quantize(model, calib, sub8.QuantConfig(layer_bits=layer_bits, w_symmetric=w_symmetric, pipeline="rtn"))
    onnx_model, storage = to_onnx(qm.module, (1, 3, 32, 32))
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _onnx_outputs(onnx_model, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
    assert np.abs(out - ref).max() <= 1e-2 * (ref.max() - ref.min())
    if layer_bits:
        assert storage["dw"] == {"weight": "uint4", "input": "uint8 (4-bit grid)"}
        assert storage["block.conv1"] == {"weight": "uint8 (3-bit grid)", "input": "uint8 (5-bit grid)"}
    elif w_symmetric:
        assert storage["stem.0"]["weight"] == "int8"  # first layer: 8 bits
        portable, storage = to_onnx(qm.module, (1, 3, 32, 32), weights="uint8")
        assert storage["stem.0"]["weight"] == "uint8 (signed codes + 128)"
        assert np.array_equal(_onnx_outputs(portable, x).argmax(1), ref.argmax(1))
        with pytest.raises(sub8.Sub8Error, match="weights must be one of int8, uint8"):
            to_onnx(qm.module, (1, 3, 32, 32), weights="int16")


def test_onnx_export_refuses_an_unknown_op():
    from sub8.export.onnx_qdq import to_onnx

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.fc(x), 1)

    qm = sub8.quantize(Odd(), torch.randn(8, 4), sub8.QuantConfig())
    with pytest.raises(sub8.Sub8Error, match="cumsum"):
        to_onnx(qm.module, (1, 4))


def test_cli_quantize_then_export(image_dirs, tmp_path):
    calib, _ = image_dirs
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                       "--w-bits", "4", "--a-bits", "8", "--pipeline", "rtn", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.load(open(out / "report.json"))
    art = report["artifact"]
    assert art["bytes"] == os.path.getsize(out / FILENAME)
    assert abs(art["tensor_bytes"] / (report["size"]["weight_bits"] / 8) - 1) < 0.02
    result = CliRunner().invoke(main, ["export", str(out), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    record = json.load(open(out / "report.json"))["export"]["onnx"]
    assert record["opset"] == 21 and os.path.getsize(tmp_path / "m.onnx") == record["bytes"]
    assert record["layers"]["block.conv1"] == {"weight": "uint4", "input": "uint8"}  # asymmetric below 8 bits
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nothing"), "--onnx", str(tmp_path / "x.onnx")])
    assert result.exit_code != 0 and "has no model.safetensors" in result.output


# -- MobileNetV2 on the embedded photos (slow, still run in CI) --------------------------------
@pytest.fixture(scope="module")
def mobilenet_photos(tmp_path_factory):
    from sub8.data import load_images
    from sub8.data.demo import build_demo_set
    from sub8.zoo import load_model
    calib_dir, eval_dir = build_demo_set(str(tmp_path_factory.mktemp("demo")))
    loaded = load_model("zoo:mobilenet_v2")
    return (loaded, load_images(calib_dir, loaded.transform, limit=32, seed=0).images,
            load_images(eval_dir, loaded.transform, seed=0).images)


@pytest.mark.slow
@pytest.mark.parametrize("w_bits, a_bits, most", [(4, 4, 0.20), (2, 4, 0.16)])
def test_mobilenet_v2_artifact_size(tmp_path, monkeypatch, mobilenet_photos, w_bits, a_bits, most):
    loaded, calib, _ = mobilenet_photos
    # (min/max ranges: the size does not depend on the range method, and they are quick)
    qm = sub8.quantize(loaded.module, calib[:8], sub8.QuantConfig(w_bits=w_bits, a_bits=a_bits, ranges="minmax",
                                                                      pipeline="rtn"))
    path = sub8.save(qm, str(tmp_path), "zoo:mobilenet_v2", (1, 3, 224, 224))
    torch.save(loaded.module.state_dict(), tmp_path / "float.pt")
    ratio = os.path.getsize(path) / os.path.getsize(tmp_path / "float.pt")
    # Measured: 0.181 (W4A4) and 0.143 (W2A4): the 8-bit classifier alone is 9% of the float file.
    assert ratio <= most
    from sub8.export.artifact import artifact_size
    assert abs(artifact_size(path, qm.report["size"])["tensor_vs_reported"] - 1) < 0.02
    x = calib[:4]

    def no_weights(*args, **kwargs):
        raise AssertionError("loading an artifact must not read the float weights file")

    monkeypatch.setattr("sub8.zoo.load_weights_into", no_weights)
    with torch.no_grad():
        assert torch.equal(sub8.load(str(tmp_path))(x), qm(x))


@pytest.mark.slow
@pytest.mark.parametrize("w_symmetric", [False, True])
def test_mobilenet_v2_w8a8_onnx_runtime_agrees_with_sub8(mobilenet_photos, w_symmetric):
    from sub8.export.onnx_qdq import to_onnx
    loaded, calib, evals = mobilenet_photos
    qm = sub8.quantize(loaded.module, calib, sub8.QuantConfig(w_bits=8, a_bits=8, w_symmetric=w_symmetric))
    out = _onnx_outputs(to_onnx(qm.module, (1, 3, 224, 224))[0], evals)
    with torch.no_grad():
        ref = qm(evals).numpy()
        ref64 = copy.deepcopy(qm.module).double()(evals.double()).numpy()
    span = ref.max() - ref.min()
    top2 = np.sort(ref, 1)[:, -2:]
    flipped = out.argmax(1) != ref.argmax(1)
    own_agreement = (ref64.argmax(1) == ref.argmax(1)).mean()
    own_error = np.abs(ref64 - ref).max() / span
    print(f"ONNX Runtime vs sub8: top-1 agreement {1 - flipped.mean():.3f}, max error "
          f"{np.abs(out - ref).max() / span:.4f} of the logit range; sub8 float32 vs float64: "
          f"{own_agreement:.3f}, {own_error:.4f}")
    # The quantized network is chaotic under float rounding: a code that flips (a value within a
    # rounding error of a half-integer) moves the next layer's inputs by a step, which flips more
    # codes there, so the flips grow layer by layer (8 photos, float32 vs float64: 6e-6 of the
    # codes differ at the second conv's input, 0.3 by the tenth block, 0.88 at the last conv's).
    # So no other arithmetic can agree with sub8's on every near-tie photo, not even sub8's own
    # in float64: the bar is to be as close to sub8 as sub8 in float64 is. Measured on the 70
    # photos with the default's channel equalization (its factors folded into the producing
    # convolutions): ONNX Runtime 1.000/0.026 (asymmetric weights), 0.957/0.026 (symmetric);
    # float64 0.957/0.023 and 0.986/0.022.
    assert 1 - flipped.mean() >= own_agreement - 0.04
    assert np.abs(out - ref).max() <= 1.5 * own_error * span
    assert ((top2[:, 1] - top2[:, 0])[flipped] <= 0.025 * span).all()  # measured: at most 0.017


def test_onnx_runtime_matches_sub8_on_concatenation_hardsigmoid_and_stochastic_depth():
    from torchvision.ops import stochastic_depth

    from sub8.export.onnx_qdq import to_onnx

    class Branches(torch.nn.Module):  # squeezenet's concatenated branches, mobilenet_v3's gate
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 3, padding=1)
            self.gate = torch.nn.Hardsigmoid()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = stochastic_depth(y * self.gate(y), 0.2, "row", training=False)
            return self.fc(torch.flatten(self.pool(y), 1))

    qm = sub8.quantize(Branches().eval(), torch.randn(16, 3, 8, 8), sub8.QuantConfig(pipeline="rtn", cache_dir=None))
    onnx_model, _ = to_onnx(qm.module, (1, 3, 8, 8))
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _onnx_outputs(onnx_model, x)
    assert np.abs(out - ref).max() <= 1e-2 * (ref.max() - ref.min())
