import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))  # tinymodels, for python:tinymodels:... specs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test caches into its own folder, never the user's ~/.cache."""
    monkeypatch.setenv("SUB8_CACHE_DIR", str(tmp_path / "sub8-cache"))


def write_images(folder, n, size=(40, 32), seed=0):
    """n small RGB PNGs with smooth structure (gradients plus noise)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=g)
        ramp = torch.linspace(0, 1, size[0])[None, None, :] * torch.rand(3, 1, 1, generator=g)
        img = (base + ramp + 0.2 * torch.rand(3, size[1], size[0], generator=g)).clamp(0, 1)
        arr = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:03d}.png"))
    return folder


@pytest.fixture
def image_dirs(tmp_path):
    calib = write_images(str(tmp_path / "calib"), 12, seed=1)
    evals = write_images(str(tmp_path / "eval"), 8, seed=2)
    return calib, evals
