"""DIR/model.safetensors: the deployable artifact (format spec: docs/artifact-format.md).

Each quantized layer's weight is stored as integer codes packed at its bit-width with its
per-channel steps and zero points; biases and float layers are float32, every other tensor keeps its dtype.
A JSON header (safetensors metadata key "sub8") says how to read each layer and how to rebuild
the model. Loading reproduces the saved model's outputs bit for bit: the weight is rebuilt as
(code - zero) * step, which its quantizer maps back onto the same code.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .._version import __version__
from ..adapters import prepare
from ..atomic import write_bytes_atomic
from ..config import QuantConfig
from ..errors import Sub8Error
from ..prepare import QuantizedModel
from ..quant.embedding import quant_embeddings
from ..quant.layers import quant_layers, quant_operands
from ..quant.quantizer import Quantizer, grid
from ..zoo import load_model
from .pack import pack, packed_bytes, unpack

FORMAT = "sub8.artifact"
# 4: a convolution may have its input smoothing too (channel equalization), the header giving
# its length; 3: a layer may have its input smoothing (`smooth`: SmoothQuant); 2: the header's config is
# QuantConfig.to_dict() with its own version (method settings under "methods"); 1: the config's
# method settings were top-level. All are read.
VERSION = 4
READS = (1, 2, 3, 4)
FILENAME = "model.safetensors"
METADATA_KEY = "sub8"


def _grid_header(q: Quantizer, axis: int | None) -> dict | None:
    if not q.enabled:
        return None
    if not q.initialized:
        raise Sub8Error("cannot save a quantizer whose range was never calibrated")
    return {"bits": q.bits, "signed": q.signed, "symmetric": q.symmetric, "axis": axis}


def _offset_uint8(values: torch.Tensor, qmin: int) -> torch.Tensor:
    """Integers in [qmin, qmax] stored as value - qmin (unsigned, < 256)."""
    return (values.detach().cpu().round() - qmin).to(torch.uint8)


def _weight_tensors(name: str, weight: torch.Tensor, wq: Quantizer) -> dict:
    """A weight as packed codes with its per-channel steps (and zero points), or float32."""
    if not wq.enabled:
        return {f"{name}.weight": weight.detach().cpu().float()}
    with torch.no_grad():
        codes = _offset_uint8(wq.codes(weight.detach()), wq.qmin).numpy()
    tensors = {f"{name}.weight.codes": torch.from_numpy(pack(codes, wq.bits)),
               f"{name}.weight.step": wq.step.detach().cpu().float()}
    if not wq.symmetric:
        tensors[f"{name}.weight.zero_point"] = _offset_uint8(wq.zero_point, wq.qmin)
    return tensors


def _input_tensors(name: str, iq: Quantizer) -> dict:
    """An activation grid: its step (and zero point); nothing when it is float."""
    if not iq.enabled:
        return {}
    tensors = {f"{name}.input.step": iq.step.detach().cpu().float()}
    if not iq.symmetric:
        tensors[f"{name}.input.zero_point"] = _offset_uint8(iq.zero_point, iq.qmin)
    return tensors


def _module_tensors(section: str, name: str, m) -> tuple[dict, dict]:
    """(header entry, tensors) of one quantized module: a layer (weight, bias, input), an
    embedding table (weight) or an operand (input)."""
    if section == "inputs":
        return _grid_header(m.input_quantizer, None), _input_tensors(name, m.input_quantizer)
    wq = m.weight_quantizer
    header = {"weight_shape": list(m.layer.weight.shape), "weight": _grid_header(wq, 0)}
    tensors = _weight_tensors(name, m.layer.weight, wq)
    if section == "layers":
        header["input"] = _grid_header(m.input_quantizer, None)
        tensors.update({f"{name}.bias": m.layer.bias.detach().cpu().float(),
                        **_input_tensors(name, m.input_quantizer)})
        if m.smooth is not None:  # the input's factor per feature, before its quantizer
            header["smooth"] = m.smooth.numel()
            tensors[f"{name}.input.smooth"] = m.smooth.detach().cpu().float()
    return header, tensors


def _quantized_modules(module: torch.nn.Module) -> dict[str, dict]:
    """{header section: {name: module}} of everything stored as integers or grids."""
    return {"layers": quant_layers(module), "embeddings": quant_embeddings(module),
            "inputs": quant_operands(module)}


def save(qmodel: QuantizedModel, out_dir: str, spec: str, input_shape: tuple[int, ...],
         preprocessing: str | None = None) -> str:
    """Write out_dir/model.safetensors atomically; returns its path."""
    state = qmodel.module.state_dict()
    tensors, sections, covered = {}, {}, set()
    for section, modules in _quantized_modules(qmodel.module).items():
        sections[section] = {}
        for name, m in modules.items():
            sections[section][name], own = _module_tensors(section, name, m)
            tensors.update(own)
            covered.update(k for k in state if k.startswith(name + "."))
    for key, value in state.items():
        if key not in covered and isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
    header = {"format": FORMAT, "version": VERSION, "sub8_version": __version__, "model": spec,
              "input_shape": list(input_shape), "preprocessing": preprocessing,
              "config": qmodel.report.get("config", {}), **sections}
    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    path = os.path.join(out_dir, FILENAME)
    write_bytes_atomic(path, data)
    return path


def artifact_size(path: str, size: dict) -> dict:
    """The artifact's bytes on disk beside the size the report computes (size.weight_bits):
    the tensors should match it, the header is the metadata on top."""
    total = os.path.getsize(path)
    _, header_bytes = read_header(path)
    expected = size["weight_bits"] / 8
    return {"file": FILENAME, "bytes": total, "header_bytes": header_bytes,
            "tensor_bytes": total - header_bytes, "reported_bytes": expected,
            "tensor_vs_reported": (total - header_bytes) / expected,
            "ratio_to_float32": total / (size["float_bits"] / 8)}


def read_header(path: str) -> tuple[dict, int]:
    """The artifact's sub8 header and the byte length of the safetensors header."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise Sub8Error(f"{path!r} is truncated: not a safetensors file")
            length = int.from_bytes(prefix, "little")
            if length > os.path.getsize(path) - 8:
                raise Sub8Error(f"{path!r} is truncated: its header claims {length} bytes")
            raw = json.loads(fh.read(length))
    except FileNotFoundError:
        raise Sub8Error(f"{os.path.dirname(path) or '.'!r} has no {FILENAME}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Sub8Error(f"{path!r} is not a safetensors file (unreadable header)") from None
    try:
        header = json.loads(raw["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise Sub8Error(f"{path!r} is a safetensors file without a sub8 header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise Sub8Error(f"{path!r} is not a sub8 artifact (format {header.get('format')!r})")
    if header.get("version") not in READS:
        raise Sub8Error(f"{path!r} has format version {header.get('version')!r}; this sub8 reads "
                        f"{', '.join(map(str, READS))} (a newer sub8 wrote it?)")
    for key in ("model", "input_shape", "config", "layers"):
        if key not in header:
            raise Sub8Error(f"{path!r}: the sub8 header has no {key!r}")
    return header, 8 + length


class _Reader:
    """Takes tensors out of the artifact by name, checking dtype and shape."""

    def __init__(self, path: str, tensors: dict):
        self.path, self.tensors = path, tensors

    def take(self, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.tensors:
            raise Sub8Error(f"{self.path!r} lacks the tensor {key!r}")
        t = self.tensors.pop(key)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise Sub8Error(f"{self.path!r}: {key!r} is {t.dtype} {tuple(t.shape)}, "
                            f"expected {dtype} {tuple(shape)}")
        return t


def _quantizer_state(template: dict, prefix: str, grid_header: dict | None, reader: _Reader,
                     key: str) -> dict:
    """One quantizer's state-dict entries (step, zero point, grid) from the artifact; shapes come
    from the rebuilt model, so an artifact that does not fit it is refused."""
    shape = template[f"{prefix}.step"].shape
    if grid_header is None:
        return {f"{prefix}.step": torch.ones(shape), f"{prefix}.zero_point": torch.zeros(shape),
                f"{prefix}._extra_state": {"bits": -1, "signed": False, "symmetric": False,
                                           "initialized": False}}
    bits, signed, symmetric = int(grid_header["bits"]), bool(grid_header["signed"]), bool(grid_header["symmetric"])
    if not 2 <= bits <= 8:
        raise Sub8Error(f"{reader.path!r}: {key} has {bits} bits (2..8 expected)")
    qmin = grid(bits, signed)[0]
    step = reader.take(f"{key}.step", shape, torch.float32)
    zero = torch.zeros(shape) if symmetric else reader.take(f"{key}.zero_point", shape, torch.uint8).float() + qmin
    return {f"{prefix}.step": step, f"{prefix}.zero_point": zero,
            f"{prefix}._extra_state": {"bits": bits, "signed": signed, "symmetric": symmetric,
                                       "initialized": True}}


def _weight_state(name: str, header: dict, template: dict, reader: _Reader) -> dict:
    """A module's weight and its quantizer's state, rebuilt as (code - zero) * step."""
    shape = tuple(template[f"{name}.layer.weight"].shape)
    if tuple(header["weight_shape"]) != shape:
        raise Sub8Error(f"{reader.path!r}: {name!r} has weight shape {header['weight_shape']}, "
                        f"the model's is {list(shape)}")
    wq = f"{name}.weight_quantizer"
    state = _quantizer_state(template, wq, header["weight"], reader, f"{name}.weight")
    if header["weight"] is None:
        weight = reader.take(f"{name}.weight", shape, torch.float32)
    else:
        bits, count = state[f"{wq}._extra_state"]["bits"], int(np.prod(shape))
        qmin = grid(bits, state[f"{wq}._extra_state"]["signed"])[0]
        packed = reader.take(f"{name}.weight.codes", (packed_bytes(count, bits),), torch.uint8)
        codes = torch.from_numpy(unpack(packed.numpy(), bits, count).astype(np.float32)).reshape(shape) + qmin
        view = (-1,) + (1,) * (len(shape) - 1)
        weight = (codes - state[f"{wq}.zero_point"].view(view)) * state[f"{wq}.step"].view(view)
    state[f"{name}.layer.weight"] = weight
    return state


def _input_state(name: str, grid_header: dict | None, template: dict, reader: _Reader) -> dict:
    return _quantizer_state(template, f"{name}.input_quantizer", grid_header, reader, f"{name}.input")


def _module_state(section: str, name: str, header, template: dict, reader: _Reader) -> dict:
    if section == "inputs":
        return _input_state(name, header, template, reader)
    state = _weight_state(name, header, template, reader)
    if section == "layers":
        state.update(_input_state(name, header["input"], template, reader))
        state[f"{name}.layer.bias"] = reader.take(f"{name}.bias", template[f"{name}.layer.bias"].shape,
                                                  torch.float32)
        smooth = header.get("smooth")
        if smooth:  # version 3 wrote True: a Linear's input features
            length = header["weight_shape"][1] if smooth is True else int(smooth)
            state[f"{name}.smooth"] = reader.take(f"{name}.input.smooth", (length,), torch.float32)
    return state


def load(run_dir: str, device: str = "cpu") -> QuantizedModel:
    """Rebuild the quantized model saved in run_dir/model.safetensors (no calibration data and
    no float weights file needed)."""
    path = os.path.join(run_dir, FILENAME)
    header, _ = read_header(path)
    try:
        with open(path, "rb") as fh:
            tensors = st_load(fh.read())
    except SafetensorError as exc:
        raise Sub8Error(f"{path!r} is damaged: {exc}") from None
    try:
        config = QuantConfig.from_dict({**header["config"], "device": device})
    except Sub8Error as exc:
        raise Sub8Error(f"{path!r} (sub8 {header.get('sub8_version')}): its config does not load: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise Sub8Error(f"{path!r} (sub8 {header.get('sub8_version')}): malformed config ({exc})") from None
    loaded = load_model(header["model"], architecture_only=True)
    prepared = prepare(loaded.module, torch.zeros(header["input_shape"]), config)
    template = prepared.module.state_dict()
    reader = _Reader(path, tensors)
    state = {}
    for section, modules in _quantized_modules(prepared.module).items():
        saved = header.get(section, {})
        if not isinstance(saved, dict) or set(modules) != set(saved):
            odd = sorted(set(modules) ^ set(saved if isinstance(saved, dict) else ()))
            raise Sub8Error(f"{path!r} does not fit {header['model']}: {section} {', '.join(odd[:5])} differ")
        try:
            for name in modules:
                state.update(_module_state(section, name, saved[name], template, reader))
        except (KeyError, TypeError, ValueError) as exc:
            raise Sub8Error(f"{path!r}: malformed {section} header ({type(exc).__name__}: {exc})") from None
    for key, value in template.items():
        if key not in state and isinstance(value, torch.Tensor):
            state[key] = reader.take(key, value.shape, value.dtype)
    if reader.tensors:
        raise Sub8Error(f"{path!r} has tensors the model does not: {', '.join(sorted(reader.tensors)[:5])}")
    prepared.module.load_state_dict(state)
    prepared.sync_bits()
    return QuantizedModel(prepared, {"config": header["config"], "artifact": header})
