"""DIR/model.pt: the quantized model as a plain state dict plus what is needed to rebuild it.

Everything in the file is a tensor or a plain Python value, so it loads with
torch.load(weights_only=True). The quantizers' grids travel in their `_extra_state` entries.
"""

from __future__ import annotations

import io
import os

import torch

from .config import QuantConfig
from .errors import Sub8Error
from .pipeline import QuantizedModel
from .prepare import prepare
from .report import write_bytes_atomic
from .zoo import load_model

FORMAT = "sub8.model.pt"
VERSION = 1
FILENAME = "model.pt"


def save(qmodel: QuantizedModel, out_dir: str, spec: str, input_shape: tuple[int, ...]) -> str:
    path = os.path.join(out_dir, FILENAME)
    payload = {"format": FORMAT, "version": VERSION, "model": spec, "input_shape": list(input_shape),
               "config": qmodel.report.get("config", {}),
               "state_dict": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                              for k, v in qmodel.module.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load(run_dir: str, device: str = "cpu") -> QuantizedModel:
    """Rebuild the quantized model that `sub8 quantize --out run_dir` saved."""
    path = os.path.join(run_dir, FILENAME)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Sub8Error(f"{run_dir!r} has no {FILENAME}") from None
    except Exception as exc:
        raise Sub8Error(f"{path!r} is not a readable sub8 model: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Sub8Error(f"{path!r} is not a sub8 model file")
    if payload.get("version") != VERSION:
        raise Sub8Error(f"{path!r} has format version {payload.get('version')}, this sub8 reads {VERSION}")
    config = dict(payload["config"])
    config["device"] = device
    config["layer_bits"] = {k: tuple(v) for k, v in config.get("layer_bits", {}).items()}
    loaded = load_model(payload["model"], architecture_only=True)
    prepared = prepare(loaded.module, torch.zeros(payload["input_shape"]), QuantConfig(**config))
    prepared.module.load_state_dict(payload["state_dict"])
    prepared.sync_bits()  # bits come from the state (bit allocation may have mixed them)
    return QuantizedModel(prepared, {"config": payload["config"]})
