"""The adapter interface: what a run needs to know about a model kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import Sub8Error
from ..evaluate import compare, compare_embeddings


@dataclass
class Samples:
    """Samples read from disk, as the model takes them (one tensor, N first)."""
    tensor: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files
    label_source: str = "none"                         # where labels came from (report.json)


class ModelAdapter:
    kind = "model"
    output = "logits"          # "logits" (a classifier) or "embedding" (a feature extractor)

    @classmethod
    def accepts(cls, model) -> bool:
        raise NotImplementedError

    def prepare(self, model, example: torch.Tensor, config):
        raise NotImplementedError

    def output_of(self, model) -> str:
        return getattr(model, "sub8_output", self.output)

    def default_output_loss(self, model) -> str:
        """The label-free loss of quantized vs float outputs that fits the model's output."""
        return "mse" if self.output_of(model) == "embedding" else "kl"

    def default_ranges(self) -> str:
        """What `--ranges auto` means for this kind of model: `auto` (at 8 bits min-max weights
        and percentile activations, MSE below; quant/ranges.py) unless the adapter knows better."""
        return "auto"

    def headline_metric(self, model) -> str:
        return "cosine_similarity" if self.output_of(model) == "embedding" else "top1_agreement_confident"

    def compare(self, model, float_out, quant_out, labels=None, probe=None) -> dict:
        """The quantized model's metrics against the float model's outputs."""
        if self.output_of(model) == "embedding":
            out = compare_embeddings(float_out, quant_out)
            if labels is not None and probe is not None:
                out["accuracy"] = probe.accuracy(quant_out, labels)
            return out
        return compare(float_out, quant_out, labels)

    def load_samples(self, path: str, loaded, role: str, limit: int | None = None, seed: int = 0,
                     **options) -> Samples:
        """Samples from disk for this kind of model (`options`: the kind's own reading options)."""
        raise NotImplementedError

    def describe_input(self, loaded) -> str:
        """The preprocessing, as text, for the artifact's header."""
        return repr(loaded.transform)

    def fit_probe(self, loaded, path, eval_path, config, **options):
        raise Sub8Error("--probe-train is for sentence encoders (text models)")
