"""Output-aware weights for AdaQuant's reconstruction loss (`--adaquant-loss fisher`).

A layer's plain output MSE counts every element alike, but the model's output does not: on
MobileNetV2 at A4, the input step of `features.17.conv.0.0` that minimizes that layer's output
MSE (the widest one) leaves no confident photo's top-1 intact, while a step 12x smaller keeps
all of them and has a 2x larger layer MSE. Weighting each element of the squared error by the
diagonal of the output loss's Fisher (Gauss-Newton) matrix, carried back to that element,
approximates the increase of the output loss instead (as BRECQ does for blocks):

    w = E_u[(J^T u)^2],   J = d(model output) / d(layer's activated output),

with u drawn so that E[u u^T] is the output loss's Hessian at the float output: u = p - onehot(y),
y ~ softmax, for KL (classifiers); u ~ N(0, I) for MSE (feature extractors; its constant scale
does not matter). Each draw is one backward pass of the float model; the weights are averaged
over `draws` and scaled to mean 1 per layer, so the loss stays on the scale of the plain MSE.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..errors import Sub8Error
from ..heap import cat_freeing
from ..quant.layers import float_mode
from ..quant.token_mask import current_mask, real_tokens

# A backward pass holds the whole model's activations: on MobileNetV2 (224x224, 64 images, 12
# layers' weights), batches of 8 peaked 1.2 GB lower than batches of 32, and took 8 s against 23 s
# on one CPU thread.
MAX_BATCH = 8


class GradTap(nn.Module):
    """Identity that records the tensor passing through it, for a gradient to be taken there."""

    def __init__(self, name: str, seen: list):
        super().__init__()
        self.name = name
        self.seen = seen

    def forward(self, x):
        self.seen.append((self.name, x, current_mask()))  # (text models: the batch's real tokens)
        return x


def tapped_copy(module: nn.Module, names: list[str], followed: dict, seen: list,
                at: dict[str, str] | None = None) -> nn.Module:
    """A copy of `module` that records each named layer's activated output in `seen`: after the
    ReLU/ReLU6 that follows it in the graph (the gradient at the layer's own output is zero
    wherever that activation clamps), else the layer's output. `at` (traced models): tap the
    graph node `at[name]` instead (a block's output)."""
    module = copy.deepcopy(module)
    if not isinstance(module, fx.GraphModule):  # no graph: no activation is known to follow
        for name in names:
            tap = GradTap(name, seen)
            module.get_submodule(name).register_forward_hook(lambda m, args, out, tap=tap: _tap_first(tap, out))
        return module
    graph = module.graph
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    by_name = {n.name: n for n in graph.nodes}
    for k, name in enumerate(names):
        node = by_name[at[name]] if at else nodes[name]
        if not at and followed.get(name) is not None:
            node = next(iter(node.users))  # the graph analysis found exactly one user, the activation
        target = f"sub8_grad_tap_{k}"
        module.add_submodule(target, GradTap(name, seen))
        with graph.inserting_after(node):
            tap = graph.call_module(target, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    module.recompile()
    return module


def _tap_first(tap: GradTap, out):
    """Tap a module's output, or the first of the outputs it returns (a transformer layer's)."""
    if isinstance(out, tuple):
        return (tap(out[0]), *out[1:])
    return tap(out)


def _layout(t: torch.Tensor):
    return torch.channels_last if t.dim() == 4 else torch.contiguous_format


def output_direction(kind: str, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random u with E[u u^T] the output loss's Hessian (up to scale) at the float output."""
    flat = out.detach().flatten(1).float()
    if kind == "kl":
        p = torch.softmax(flat, dim=1)
        y = torch.multinomial(p.cpu(), 1, generator=generator).to(p.device)
        u = p.scatter_add(1, y, -torch.ones_like(y, dtype=p.dtype))
    elif kind == "mse":
        u = torch.randn(flat.shape, generator=generator).to(flat.device)
    else:
        raise Sub8Error(f"unknown output loss {kind!r} for Fisher weights")
    return u.view_as(out).to(out.dtype)


def fisher_weights(reference: nn.Module, names: list[str], followed: dict, calib: torch.Tensor,
                   kind: str, draws: int, batch: int, seed: int, dtype: torch.dtype,
                   at: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Per-element weights of each named layer's activated output, for every calibration sample,
    in the layout of AdaQuant's cache (channels-last for images, real tokens for text), mean 1
    per layer."""
    seen: list = []
    tapped = tapped_copy(reference, names, followed, seen, at)
    tapped.requires_grad_(True)  # a private copy: its parameters only make autograd record the graph
    device = next(tapped.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # (text: real tokens, batch by batch)
    full: dict[str, torch.Tensor] = {}
    batch = min(batch, MAX_BATCH)
    with float_mode(tapped), torch.enable_grad():
        for i in range(0, len(calib), batch):
            seen.clear()
            out = tapped(calib[i:i + batch].to(device))
            if not isinstance(out, torch.Tensor):
                raise Sub8Error("--adaquant-loss fisher (the default) needs a model whose output is one tensor; "
                                "use --adaquant-loss mse")
            taps = [t for _, t, _ in seen]
            squares = [torch.zeros_like(t, dtype=torch.float32) for t in taps]
            for r in range(draws):
                u = output_direction(kind, out, generator)
                grads = torch.autograd.grad(out, taps, u, retain_graph=r < draws - 1, allow_unused=True)
                for (name, _, _), g, acc in zip(seen, grads, squares):
                    if g is None:
                        raise Sub8Error(f"layer {name!r} does not reach the model's output: no Fisher weights "
                                        f"for it; use --adaquant-loss mse")
                    acc.add_(g.float().square())
            for (name, _, mask), acc in zip(seen, squares):
                w = real_tokens(acc / draws, mask)
                if mask is None:  # a row per sample: written into place (no second copy at the end)
                    if name not in full:
                        full[name] = torch.empty((len(calib), *w.shape[1:]), dtype=dtype, device=w.device,
                                                 memory_format=_layout(w))
                    full[name][i:i + len(w)] = w
                else:
                    parts[name].append(w.to(dtype, memory_format=_layout(w)))
    weights = {}
    for n in names:
        w = full.pop(n) if n in full else cat_freeing(parts.pop(n))
        mean = w.float().mean()
        weights[n] = w.div_(mean) if mean > 0 else w.fill_(1.0)  # in place: these are cache-sized
    return weights
