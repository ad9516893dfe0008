"""Reconstruction units of a model that runs without a graph (a transformers model): each unit
is a module call, such as one transformer layer's.

A unit's inputs are the arguments of its call, recorded by a hook while the model runs on the
calibration set (the hidden states, the attention mask and whatever else the model passes);
the ones with a row per sample are cached, the rest (flags, shared position tensors) are kept
from the first batch and must not change. Token sequences run at the set's full padded length
(quant.token_mask.full_length), so that every batch's tensors line up, and the loss counts the
real tokens only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import Sub8Error
from ..quant.layers import QuantInput, QuantLayer, StopForward
from ..quant.token_mask import current_mask, full_length


class CallRecord:
    """One unit's call for every sample: the cached per-sample arguments, a template holding the
    others, the output (when asked for) and the token mask (text models)."""

    def __init__(self, spec, leaves: list, per_sample: list[int], tensors: list[torch.Tensor],
                 output: torch.Tensor | None, mask: torch.Tensor | None):
        self.spec, self.leaves, self.per_sample = spec, leaves, per_sample
        self.tensors, self.output, self.mask = tensors, output, mask

    def template(self) -> "CallRecord":
        """What calling the unit needs besides the per-sample tensors (not the cache)."""
        return CallRecord(self.spec, self.leaves, self.per_sample, [], None, None)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and bool(torch.equal(a, b))
    return a == b


def record_call(model: nn.Module, name: str, calib: torch.Tensor, batch: int, dtype: torch.dtype,
                want_output: bool) -> CallRecord:
    """Run `model` over `calib` in batches up to `name`'s call (through it with `want_output`)."""
    target = model.get_submodule(name)
    seen: dict = {}

    def before(m, args, kwargs):
        seen["call"], seen["mask"] = (args, kwargs), current_mask()
        if not want_output:
            raise StopForward

    def after(m, args, kwargs, out):
        seen["out"] = _first(out)
        raise StopForward

    handles = [target.register_forward_pre_hook(before, with_kwargs=True)]
    if want_output:
        handles.append(target.register_forward_hook(after, with_kwargs=True))
    spec, template, per_sample, parts, outs, masks = None, None, None, [], [], []
    try:
        with torch.no_grad(), full_length():
            for i in range(0, len(calib), batch):
                seen.clear()
                try:
                    model(calib[i:i + batch])
                except StopForward:
                    pass
                if "call" not in seen:
                    raise Sub8Error(f"block reconstruction: the model never called {name!r}")
                leaves, this_spec = pytree.tree_flatten(seen["call"])
                n = min(batch, len(calib) - i)
                if spec is None:
                    spec, template = this_spec, leaves
                    # (in a first batch of one, a shared 1 x ... tensor counts as per sample: its
                    # copies broadcast as the original does)
                    per_sample = [k for k, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.dim()
                                  and v.shape[0] == n]
                if this_spec != spec or any(not _same(v, template[k]) for k, v in enumerate(leaves)
                                            if k not in per_sample):
                    raise Sub8Error(f"block reconstruction: {name!r} is called with arguments that change "
                                    f"from batch to batch beyond a row per sample; use --reconstruct layer")
                parts.append([_cached(leaves[k], dtype) for k in per_sample])
                if want_output:
                    outs.append(_cached(seen["out"], dtype))
                if seen["mask"] is not None:
                    masks.append(seen["mask"].bool())
    finally:
        for h in handles:
            h.remove()
    tensors = [torch.cat([p[j] for p in parts]) for j in range(len(per_sample))]
    return CallRecord(spec, template, per_sample, tensors, torch.cat(outs) if outs else None,
                      torch.cat(masks) if masks else None)


def _cached(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    return t.to(dtype) if t.is_floating_point() else t.clone()


class CallUnit(nn.Module):
    """The unit's module called on per-sample tensors (the rest from the template), with its
    quantized submodules replaced by `stand_ins` ({path inside the unit: module}) during the call.
    Returns a one-tuple: the call's first output."""

    def __init__(self, module: nn.Module, record: CallRecord, stand_ins: dict | None = None):
        super().__init__()
        self.__dict__.update(target=module, record=record, stand_ins=stand_ins or {})  # not submodules

    def forward(self, *xs):
        leaves = list(self.record.leaves)
        for k, x in zip(self.record.per_sample, xs):
            leaves[k] = x
        args, kwargs = pytree.tree_unflatten(leaves, self.record.spec)
        with full_length(), swapped(self.target, self.stand_ins):
            module = self.stand_ins.get("", self.target)  # a unit that is one layer: its stand-in
            return (_first(module(*args, **kwargs)),)


@contextlib.contextmanager
def swapped(root: nn.Module, stand_ins: dict):
    """`root`'s submodules at the given paths replaced by the stand-ins, within the block."""
    saved = []
    try:
        for path, new in stand_ins.items():
            if not path:
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, new)
        yield
    finally:
        for parent, attr, old in reversed(saved):
            setattr(parent, attr, old)


def quantized_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The unit's quantized layers and quantizer sites, by path inside it (a layer's own
    quantizers belong to the layer)."""
    out = {}
    for path, m in module.named_modules():  # (parents come before their children)
        if isinstance(m, (QuantLayer, QuantInput)) and not any(not p or path.startswith(p + ".") for p in out):
            out[path] = m
    return out


def token_weights(mask: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor | None:
    """Loss weights that count each real token's output elements (padding 0), mean 1; None
    when the output has no token axis."""
    if mask is None or output.dim() < 2 or tuple(output.shape[:2]) != tuple(mask.shape):
        return None
    w = mask.to(output.dtype).view(*mask.shape, *[1] * (output.dim() - 2)).expand_as(output).contiguous()
    return w / w.float().mean().clamp(min=1e-12).to(w.dtype)


def padded(weights: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Fisher weights given at real tokens (N_tokens x ...) back in the output's padded layout:
    zeros at padding, mean 1 over the whole layout (as token_weights'), so that the loss, a mean
    over that layout, does not depend on how far the set is padded. Unchanged when they have the
    layout already."""
    if weights.shape == like.shape or mask is None:
        return weights
    out = torch.zeros_like(like, dtype=weights.dtype)
    out[mask.to(out.device)] = weights
    return out.div_(out.float().mean().clamp(min=1e-12).to(out.dtype))
