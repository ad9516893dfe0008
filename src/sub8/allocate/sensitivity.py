"""Per-layer sensitivity: how much an output loss grows when one layer alone takes a precision.

The loss compares the model's outputs with the float model's on the calibration set, without
labels: KL(float || quantized) of the softmax outputs (classifiers) or the mean squared error of
the outputs (feature extractors). Every layer sits at its base-precision state except the one
measured, which takes its own state for the candidate precision (its own range calibration or
parallel-AdaQuant result), so that per-layer entries add up to predict a mixed model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..evaluate import output_loss
from ..quant.layers import quant_layers


@torch.no_grad()
def model_loss(module, calib: torch.Tensor, reference: torch.Tensor, kind: str, batch: int) -> float:
    device = next(module.parameters()).device
    total = 0.0
    for i in range(0, len(calib), batch):
        out = module(calib[i:i + batch].to(device))
        total += output_loss(kind, out.float().cpu(), reference[i:i + batch]).item()
    return total / len(calib)


class SuffixRunner:
    """Runs a GraphModule on one batch once, keeping every node's value, then re-runs it from a
    given layer on: the nodes before that layer are taken from the recorded run. Measuring one
    layer's sensitivity then costs the rest of the network, not all of it. A model that is not
    a GraphModule (a transformer) is simply run whole."""

    def __init__(self, module, x: torch.Tensor):
        self.module = module
        self.x = x
        self._output = None
        if not isinstance(module, fx.GraphModule):
            return
        recorder = fx.Interpreter(module, garbage_collect_values=False)
        self._output = recorder.run(x)
        self.env = recorder.env
        self.nodes = list(module.graph.nodes)
        self.position = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module"}

    @property
    def output(self) -> torch.Tensor:
        """The model's output on the batch (recorded; run once on first use without a graph)."""
        if self._output is None:
            self._output = self.module(self.x)
        return self._output

    def from_layer(self, name: str) -> torch.Tensor:
        """The output with everything before `name`'s node (or, for a module inside one the
        graph calls whole, its nearest such ancestor) taken from the recorded run."""
        if not isinstance(self.module, fx.GraphModule):
            return self.module(self.x)
        path = name
        while path not in self.position and "." in path:
            path = path.rsplit(".", 1)[0]
        before = self.nodes[:self.position.get(path, 0)]
        return fx.Interpreter(self.module).run(self.x, initial_env={n: self.env[n] for n in before})


@torch.no_grad()
def measure(module: fx.GraphModule, qlayers: dict, layers: list[str], base_states: dict,
            states: dict[tuple, dict], calib: torch.Tensor, reference: torch.Tensor, kind: str, batch: int,
            progress=None) -> dict[tuple, dict[str, float]]:
    """{precision: {layer: loss with that layer alone at that precision}}; `module` must hold
    the base states on entry and holds them again on return."""
    totals = {p: dict.fromkeys(layers, 0.0) for p in states}
    device = next(module.parameters()).device
    for i in range(0, len(calib), batch):
        runner = SuffixRunner(module, calib[i:i + batch].to(device))
        target = reference[i:i + batch]
        for p, per_layer in states.items():
            for name in layers:
                layer = qlayers[name]
                layer.load_state_dict(per_layer[name])
                try:
                    out = runner.from_layer(name)
                finally:
                    layer.load_state_dict(base_states[name])
                totals[p][name] += output_loss(kind, out.float().cpu(), target).item()
                if progress is not None:
                    progress.update(1)
        del runner
    return {p: {n: v / len(calib) for n, v in t.items()} for p, t in totals.items()}


@dataclass
class SensitivityWork:
    """One candidate precision's column of the sensitivity table."""
    module: torch.nn.Module     # holds the base states
    layers: list[str]
    base_states: dict
    states: dict                # {layer: state at the candidate precision}
    calib: torch.Tensor
    reference: torch.Tensor
    kind: str
    batch: int


def measure_precision(work: SensitivityWork) -> dict[str, float]:
    """{layer: loss with that layer alone at the work's precision}."""
    return measure(work.module, quant_layers(work.module), work.layers, work.base_states, {0: work.states},
                   work.calib, work.reference, work.kind, work.batch)[0]
