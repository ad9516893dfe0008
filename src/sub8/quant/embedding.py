"""Quantized embedding tables: integer codes per row (one step and zero point per token row).

Only the rows a batch looks up are fake-quantized, with their own row's grid: the same values
as quantizing the whole table and then looking up, at the cost of the batch, not the table.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizer import Quantizer


class QuantEmbedding(nn.Module):
    """Wraps an nn.Embedding; `weight_quantizer` is per row (axis 0)."""

    def __init__(self, layer: nn.Embedding, bits: int | None, symmetric: bool = False):
        super().__init__()
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"QuantEmbedding wraps nn.Embedding, not {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = Quantizer(bits, channels=layer.weight.shape[0], channel_axis=0, symmetric=symmetric)

    @property
    def w_bits(self) -> int | None:
        return self.weight_quantizer.bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.layer(ids)
        q = self.weight_quantizer
        if q.bypass or not q.enabled:
            return rows
        return q.fake_quant_rows(rows, ids)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits or 'float'}"


def quant_embeddings(module: nn.Module) -> dict[str, QuantEmbedding]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantEmbedding)}
