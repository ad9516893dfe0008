"""Image folders for calibration and evaluation: searched recursively; class sub-folders give
labels when asked. Unreadable files are skipped with a warning and counted."""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import Sub8Error

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ImageSet:
    images: torch.Tensor                 # N x C x H x W, preprocessed
    labels: torch.Tensor | None          # N, when the folder gives labels
    paths: list[str]
    skipped: list[str] = field(default_factory=list)
    classes: list[str] | None = None


class ImageFolder:
    """The image files under `root`; with labels="folders" the first sub-folder is the class.

    Class indices: if every class folder name is an integer, that integer (so a folder can
    name model output indices directly); otherwise the sorted position of the name.
    """

    def __init__(self, root: str, labels: str | None = None):
        if labels not in (None, "none", "folders"):
            raise Sub8Error(f"--labels must be 'folders' or 'none', got {labels!r}")
        if not os.path.isdir(root):
            raise Sub8Error(f"image folder {root!r} does not exist")
        self.root = root
        paths = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
        if not paths:
            raise Sub8Error(f"image folder {root!r} holds no image ({', '.join(EXTENSIONS)})")
        self.paths = paths
        self.classes = None
        self.class_index = None
        if labels == "folders":
            names = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in paths
                            if os.sep in os.path.relpath(p, root)})
            if not names:
                raise Sub8Error(f"--labels folders: {root!r} has no class sub-folders")
            self.paths = [p for p in paths if os.sep in os.path.relpath(p, root)]
            self.classes = names
            numeric = all(n.isdigit() for n in names)
            self.class_index = {n: (int(n) if numeric else i) for i, n in enumerate(names)}

    def label(self, path: str) -> int | None:
        if self.class_index is None:
            return None
        return self.class_index[os.path.relpath(path, self.root).split(os.sep)[0]]


def read_image(path: str) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def load_images(root: str, transform, limit: int | None = None, seed: int = 0,
                labels: str | None = None, role: str = "image") -> ImageSet:
    """Read and preprocess up to `limit` images (a seeded random choice when there are more)."""
    folder = ImageFolder(root, labels)
    paths = list(folder.paths)
    if limit is not None and len(paths) > limit:
        paths = sorted(random.Random(seed).sample(paths, limit))
    tensors, kept, skipped, targets = [], [], [], []
    for path in paths:
        image = read_image(path)
        if image is None:
            skipped.append(path)
            continue
        tensors.append(transform(image))
        kept.append(path)
        targets.append(folder.label(path))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable {role} file(s) in {root!r}, "
                      f"e.g. {os.path.basename(skipped[0])!r}", stacklevel=2)
    if not tensors:
        raise Sub8Error(f"{role} folder {root!r} has no readable image ({len(skipped)} unreadable)")
    label_tensor = torch.tensor(targets) if folder.class_index is not None else None
    return ImageSet(torch.stack(tensors), label_tensor, kept, skipped, folder.classes)
