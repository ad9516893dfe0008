"""Image models: traced with torch.fx, BatchNorm folded, read from image folders."""

from __future__ import annotations

from ..data import load_images
from ..prepare import prepare_traced, prepare_untraced
from .base import ModelAdapter, Samples


class ImageAdapter(ModelAdapter):
    kind = "image"

    @classmethod
    def accepts(cls, model) -> bool:
        return True

    def prepare(self, model, example, config):
        return prepare_traced(model, example, config)

    def load_samples(self, path, loaded, role, limit=None, seed=0, labels="none", **options) -> Samples:
        images = load_images(path, loaded.transform, limit=limit, seed=seed,
                             labels=labels, role=role)
        return Samples(images.images, images.labels, images.classes, images.skipped, labels or "none")


class UntracedAdapter(ImageAdapter):
    """A model that declares `sub8_traceable = False` (it does not trace with torch.fx): its
    Linear layers are wrapped in place, with no graph facts."""
    kind = "untraced"

    @classmethod
    def accepts(cls, model) -> bool:
        return not getattr(model, "sub8_traceable", True)

    def prepare(self, model, example, config):
        return prepare_untraced(model, example, config)
