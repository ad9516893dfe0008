"""Model adapters: the one place that knows what kind of model a run has.

An adapter owns what differs between model kinds: how a model is prepared (an fx graph with
BatchNorm folded, or Linear layers wrapped in place), what its output is and how float and
quantized outputs are compared, which label-free loss fits that output, how samples are read
from disk (an image folder; a text file through a tokenizer), and which positions of a sample
are real (token masks, set by the text model's own forward). Everything else asks its adapter.
"""

from __future__ import annotations

from .base import Samples, ModelAdapter
from .image import ImageAdapter, UntracedAdapter
from .text import TextAdapter

ADAPTERS = (TextAdapter, UntracedAdapter, ImageAdapter)  # the first that accepts a model wins


def adapter_for(model) -> ModelAdapter:
    for cls in ADAPTERS:
        if cls.accepts(model):
            return cls()
    raise AssertionError("ImageAdapter accepts every model")


def prepare(model, example, config):
    """Return a quantizable copy of `model` (its adapter's preparation); `model` is untouched."""
    return adapter_for(model).prepare(model, example, config)


__all__ = ["ADAPTERS", "ImageAdapter", "ModelAdapter", "Samples", "TextAdapter", "UntracedAdapter",
           "adapter_for", "prepare"]
