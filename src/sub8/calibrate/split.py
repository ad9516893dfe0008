"""The calibration samples a step trains on and those it keeps out to measure itself."""

from __future__ import annotations

import torch

from ..errors import Sub8Error


def holdout_split(n: int, share: float, seed: int, step: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held) sample indices: a seeded shuffle, `share` of it (at least one) held out."""
    n_held = max(1, int(round(share * n)))
    if n - n_held < 1:
        raise Sub8Error(f"{step} needs at least 2 calibration samples, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_held:], order[:n_held]
