"""Fold each BatchNorm2d into the conv that feeds it (in float64, then back to float32)."""

from __future__ import annotations

import torch
from torch import fx, nn


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


@torch.no_grad()
def fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv(x) followed by bn becomes a single conv with the same output."""
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_((w * scale.view(-1, *[1] * (w.dim() - 1))).to(conv.weight.dtype))
    new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every conv -> BatchNorm2d pair whose conv output feeds only that BN.

    Returns the names of the convs that absorbed a BN. BNs that cannot be folded (no conv
    before them, a conv used elsewhere too, no running statistics) stay as they are.
    """
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if (not isinstance(conv, nn.Conv2d) or len(src.users) != 1 or calls[src.target] != 1
                or calls[node.target] != 1):
            continue
        fold_into(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        folded.append(src.target)
    gm.graph.lint()
    gm.recompile()
    return folded
