"""Quantized attention for transformers models: the inputs of the two matrix products (queries,
keys, softmax probabilities, values) on per-tensor grids; the softmax itself stays in float.

transformers dispatches attention through its `AttentionInterface`: sub8 registers its own
implementation under the name "sub8" (with the eager additive mask) and switches the prepared
copy's configs to it. Each attention module that calls it gets a `sub8_attention` child that
holds its four quantizers. Which modules those are is found by running the model once.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from ..quant.layers import QuantAttention

NAME = "sub8"
CHILD = "sub8_attention"
_CALLERS: contextvars.ContextVar[list | None] = contextvars.ContextVar("sub8_attention_callers", default=None)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs):
    """transformers' eager attention (batch x heads x sequence x head size in, batch x sequence x
    heads x head size out), with the operands quantized when `module` has its quantizers."""
    sites = getattr(module, CHILD, None)
    if sites is None:
        callers = _CALLERS.get()
        if callers is not None:
            callers.append(module)
    else:
        query, key, value = sites.query(query), sites.key(key), sites.value(value)
    if key.shape[1] != query.shape[1]:  # grouped keys and values: one head serves several queries
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sites is not None:
        probs = sites.probs(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def _configs(model: nn.Module) -> list:
    """The configs of the transformers models inside `model` (each has `_attn_implementation`)."""
    return [m.config for m in model.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation") and hasattr(m, "set_attn_implementation")]


def quantize_attention(model: nn.Module, example: torch.Tensor, bits: int, symmetric: bool) -> int:
    """Run `model`'s transformers attention through sub8's and give every attention module that
    calls it a QuantAttention; returns how many did. 0 for a model without transformers parts."""
    configs = _configs(model)
    if not configs:
        return 0
    _register()
    for config in configs:
        config._attn_implementation = NAME
    callers = []
    handle = _CALLERS.set(callers)
    try:
        with torch.no_grad():
            model(example)
    finally:
        _CALLERS.reset(handle)
    unique = list({id(m): m for m in callers}.values())
    for m in unique:
        m.add_module(CHILD, QuantAttention(bits, symmetric))
    return len(unique)

