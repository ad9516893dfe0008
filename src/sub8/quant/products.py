"""Quantized matrix products of two activations: attention's q k^T and p v, written as `@`,
torch.matmul, torch.bmm, a two-operand torch.einsum or F.scaled_dot_product_attention.

Each operand gets a per-tensor QuantInput, as a layer's input does; scaled dot-product
attention is spelled out (scores, mask, softmax, dropout, p v) so that its softmax
probabilities are quantized too, as in text models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantAttention, QuantInput


def every_position(x: torch.Tensor) -> torch.Tensor:
    """What a vision model's operand observer sees: every entry (no padding to leave out)."""
    return x


class QuantProduct(nn.Module):
    """matmul(a, b) (or einsum(equation, a, b)) with both operands quantized per tensor."""

    def __init__(self, bits: int | None, symmetric: bool, equation: str | None = None):
        super().__init__()
        self.left = QuantInput(bits, symmetric, every_position)
        self.right = QuantInput(bits, symmetric, every_position)
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.left(a), self.right(b)
        return torch.matmul(a, b) if self.equation is None else torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return f"einsum {self.equation!r}" if self.equation else "matmul"


class QuantScaledDotProduct(nn.Module):
    """F.scaled_dot_product_attention with its query, key, softmax probabilities and value
    quantized (the names of text models' QuantAttention)."""

    def __init__(self, bits: int | None, symmetric: bool):
        super().__init__()
        self.sites = QuantAttention(bits, symmetric)
        for site in self.sites.children():
            site.real = every_position

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
        s = self.sites
        query, key, value = s.query(query), s.key(key), s.value(value)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale
        if is_causal:
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:  # bool: True takes part (the opposite of nn.MultiheadAttention's)
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        probs = s.probs(torch.softmax(scores, dim=-1))
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return torch.matmul(probs, value)
