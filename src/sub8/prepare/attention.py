"""nn.MultiheadAttention with its weights in Linear layers and its matrix products spelled out.

nn.MultiheadAttention keeps its query/key/value projection as one packed parameter and hands it,
with its output projection's weight, to a fused function: no Linear layer is ever called, so a
quantizer on layers never sees them. `explicit_attention` swaps every such module of a model for
`ExplicitMultiheadAttention`, the same computation (to float rounding) with four Linear layers
that are quantized like any other and, when asked, the four operands of its two products
(queries, keys, softmax probabilities, values) on per-tensor grids, as in text models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.layers import QuantAttention

CHILD = "sub8_attention"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as nn.MultiheadAttention reads it: True (bool) blocks a position; floats are added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def score_mask(attn_mask, key_padding_mask, batch: int, heads: int, dtype: torch.dtype):
    """attn_mask ((L, S) or (batch * heads, L, S)) and key_padding_mask ((batch, S)) as one
    additive mask that broadcasts over batch x heads x L x S scores."""
    total = torch.zeros((), dtype=dtype)
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        total = total.to(m.device) + (m.view(batch, heads, *m.shape[-2:]) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        m = _additive(key_padding_mask, dtype)
        total = total.to(m.device) + m.view(batch, 1, 1, -1)
    return total


fx.wrap("score_mask")  # one call in a traced graph: its branches read dtypes and shapes


class ExplicitMultiheadAttention(nn.Module):
    """What nn.MultiheadAttention computes (batched inputs, either layout, both masks, the
    averaged or per-head weights), through q_proj, k_proj, v_proj and out_proj."""

    def __init__(self, mha: nn.MultiheadAttention, bits: int | None, symmetric: bool):
        super().__init__()
        e, dtype, device = mha.embed_dim, mha.out_proj.weight.dtype, mha.out_proj.weight.device
        self.num_heads, self.head_dim, self.batch_first = mha.num_heads, mha.head_dim, mha.batch_first
        self.dropout = mha.dropout
        has_bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if has_bias else (None,) * 3
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            linear = nn.Linear(w.shape[1], e, bias=has_bias, dtype=dtype, device=device)
            with torch.no_grad():
                linear.weight.copy_(w)
                if has_bias:
                    linear.bias.copy_(b)
            self.add_module(name, linear)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, dtype=dtype, device=device)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.sub8_attention = QuantAttention(bits, symmetric) if bits is not None else None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # is_causal is only a hint in nn.MultiheadAttention: attn_mask must hold the causal mask.
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        heads, dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, tgt, heads, dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, src, heads, dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, src, heads, dim).transpose(1, 2)
        sites = self.sub8_attention
        if sites is not None:
            q, k, v = sites.query(q), sites.key(k), sites.value(v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * dim ** -0.5
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + score_mask(attn_mask, key_padding_mask, batch, heads, scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        if sites is not None:
            probs = sites.probs(probs)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = self.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(batch, tgt, heads * dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs


def rewritable(m: nn.Module) -> str | None:
    """Why nn.MultiheadAttention `m` keeps its fused form (None: it is rewritten)."""
    if m.bias_k is not None or m.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not rewritten"
    return None


def explicit_attention(model: nn.Module, bits: int | None, symmetric: bool) -> int:
    """Swap every nn.MultiheadAttention of `model` (in place) that can be for an
    ExplicitMultiheadAttention with operands on `bits`-bit grids (None: products in float);
    returns how many were swapped."""
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.MultiheadAttention and rewritable(m) is None]
    for name, m in found:
        model.set_submodule(name, ExplicitMultiheadAttention(m, bits, symmetric).train(m.training))
    return len(found)
