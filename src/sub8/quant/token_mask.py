"""Which positions of a token sequence are real: padding must not count in range statistics
or reconstruction losses (it would dominate short sentences).

A text model's forward sets the mask of its batch (`token_mask(mask)`); a quantized layer then
hands its observers only the real tokens' rows (`real_tokens(x)`), so range calibration, bias
correction and AdaQuant's cached inputs all see N_tokens x features, never a padded position.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sub8_token_mask", default=None)
_FULL: contextvars.ContextVar[bool] = contextvars.ContextVar("sub8_full_length", default=False)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor):
    """Within this block, `mask` (batch x sequence, True for real tokens) describes the batch."""
    handle = _MASK.set(mask.bool())
    try:
        yield
    finally:
        _MASK.reset(handle)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x's rows at real tokens (N_tokens x features) when x is batch x sequence x features under
    a token mask (the current one, or `mask`); x unchanged otherwise."""
    mask = _MASK.get() if mask is None else mask
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


def current_mask() -> torch.Tensor | None:
    """The current batch's token mask (for tensors that arrive after its block, as gradients do)."""
    return _MASK.get()


def real_head_tokens(x: torch.Tensor) -> torch.Tensor:
    """A batch x heads x sequence x features tensor's entries at real tokens (N_tokens x heads x
    features); x unchanged without a matching mask."""
    mask = _MASK.get()
    if mask is None or x.dim() != 4 or (x.shape[0], x.shape[2]) != tuple(mask.shape):
        return x
    return x.transpose(1, 2)[mask.to(x.device)]


def real_token_pairs(p: torch.Tensor) -> torch.Tensor:
    """A batch x heads x query x key tensor (attention probabilities) at pairs of real tokens
    (N_pairs x heads); p unchanged without a matching mask."""
    mask = _MASK.get()
    if mask is None or p.dim() != 4 or (p.shape[0], p.shape[2], p.shape[3]) != (*mask.shape, mask.shape[1]):
        return p
    mask = mask.to(p.device)
    return p.permute(0, 2, 3, 1)[mask[:, :, None] & mask[:, None, :]]


@contextlib.contextmanager
def full_length():
    """Within this block, a text model runs every batch at the set's padded length instead of
    trimming it to the batch's longest sentence (block reconstruction caches a layer's inputs
    batch by batch: they must line up)."""
    handle = _FULL.set(True)
    try:
        yield
    finally:
        _FULL.reset(handle)


def keep_full_length() -> bool:
    return _FULL.get()
