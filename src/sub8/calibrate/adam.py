"""Adam over many tensors, each with its own learning rate, in a handful of multi-tensor ops.

torch.optim.Adam runs one Python-level update per parameter group; AdaQuant has four groups
per layer (weight, bias, weight steps, input steps) and optimizes a whole model's layers in one
loop, so that per-group overhead dominated small layers and kept the GPU waiting. This is the
same update (torch's default Adam: no weight decay, no amsgrad) as one `_foreach_` call per
line over every tensor at once.
"""

from __future__ import annotations

import math

import torch


class MultiTensorAdam:
    def __init__(self, params: list[torch.Tensor], lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        if len(params) != len(lrs):
            raise ValueError("one learning rate per tensor")
        self.params = params
        self.lrs = [float(lr) for lr in lrs]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        """One Adam update; `lr_scale` multiplies every learning rate (a schedule)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.t += 1
        torch._foreach_lerp_(self.exp_avg, grads, 1 - self.beta1)
        torch._foreach_mul_(self.exp_avg_sq, self.beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - self.beta2)
        correction1 = 1 - self.beta1 ** self.t
        correction2_sqrt = math.sqrt(1 - self.beta2 ** self.t)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.exp_avg, denom, [-lr * lr_scale / correction1 for lr in self.lrs])
