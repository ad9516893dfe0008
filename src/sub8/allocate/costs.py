"""Cost models of an allocation: weight memory, BOPs and a user-supplied latency table.

Each cost of the whole model is `const + sum over allocated layers of cost[layer, precision]`;
`const` is what allocation leaves alone (fixed layers, parameters outside quantized layers).
References for ratios: the float32 model's weight memory and its BOPs at 32-bit weights and
activations (so uniform W8A8 has a BOPs ratio of 8 * 8 / 32 ** 2 = 0.0625).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import Sub8Error
from ..prepare import PreparedModel
from ..quant.quantizer import parse_bits
from ..size import FLOAT_BITS, layer_weight_bits, weight_bits

def precision_label(p: tuple) -> str:
    w, a = p
    return f"W{w or 'f'}A{a or 'f'}"


def parse_precision(text: str) -> tuple:
    """'W4A8' (or '4,8') -> (4, 8); 'f'/'float' for a float side."""
    t = text.strip().upper()
    if t.startswith("W") and "A" in t:
        w, a = t[1:].split("A", 1)
    elif "," in t:
        w, a = t.split(",", 1)
    else:
        raise Sub8Error(f"a precision looks like W4A8 or 4,8, got {text!r}")
    return tuple(parse_bits("float" if s in ("F", "FLOAT") else s) for s in (w, a))


def bops(macs: int, p: tuple) -> int:
    w, a = p
    return macs * (w or FLOAT_BITS) * (a or FLOAT_BITS)


def load_latency_table(path: str) -> dict[str, dict[tuple, float]]:
    """JSON {layer name: {"W4A8": ms, ..., optionally "float": ms}}."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise Sub8Error(f"cannot read the latency table {path!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise Sub8Error(f"the latency table {path!r} must map layer names to {{precision: ms}}")
    table = {}
    for layer, row in raw.items():
        if not isinstance(row, dict):
            raise Sub8Error(f"latency table {os.path.basename(path)}: entry {layer!r} is not a {{precision: ms}} map")
        table[layer] = {}
        for key, ms in row.items():
            p = (None, None) if key.lower() == "float" else parse_precision(key)
            if not isinstance(ms, (int, float)) or ms < 0:
                raise Sub8Error(f"latency table: {layer!r} {key!r} must be a non-negative number of ms")
            table[layer][p] = float(ms)
    return table


def cost_tables(prepared: PreparedModel, layers: list[str], states: dict[tuple, dict],
                precisions: list[tuple], latency: dict | None = None) -> tuple[dict, dict, dict]:
    """(costs, const, reference): per-layer costs of each precision (L x P arrays), the fixed
    part of each cost with the model as it stands, and each cost's float reference."""
    info = {i.name: i for i in prepared.layers}
    qlayers = prepared.quant_layers()
    costs = {"size": np.zeros((len(layers), len(precisions))), "bops": np.zeros((len(layers), len(precisions)))}
    for j, p in enumerate(precisions):
        for i, name in enumerate(layers):
            layer = qlayers[name]
            saved = layer.state_dict()
            layer.load_state_dict(states[p][name])
            costs["size"][i, j] = layer_weight_bits(layer)
            layer.load_state_dict(saved)
            costs["bops"][i, j] = bops(info[name].macs, p)
    allocated = set(layers)
    const = {"size": weight_bits(prepared) - sum(layer_weight_bits(qlayers[n]) for n in layers),
             "bops": sum(bops(i.macs, (i.w_bits, i.a_bits)) for i in prepared.layers if i.name not in allocated)}
    reference = {"size": prepared.float_params * FLOAT_BITS,
                 "bops": sum(bops(i.macs, (None, None)) for i in prepared.layers)}
    if latency is not None:
        missing = [f"{n} {precision_label(p)}" for n in layers for p in precisions if p not in latency.get(n, {})]
        fixed = [i for i in prepared.layers if i.name not in allocated]
        missing += [f"{i.name} {precision_label((i.w_bits, i.a_bits))}" for i in fixed
                    if (i.w_bits, i.a_bits) not in latency.get(i.name, {})]
        if missing:
            raise Sub8Error(f"the latency table lacks {len(missing)} entr{'y' if len(missing) == 1 else 'ies'}, "
                            f"e.g. {', '.join(missing[:3])}")
        costs["latency"] = np.array([[latency[n][p] for p in precisions] for n in layers])
        const["latency"] = sum(latency[i.name][(i.w_bits, i.a_bits)] for i in fixed)
        if all((None, None) in latency.get(i.name, {}) for i in prepared.layers):
            reference["latency"] = sum(latency[i.name][(None, None)] for i in prepared.layers)
    return costs, const, reference
