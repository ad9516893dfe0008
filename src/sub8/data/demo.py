"""The embedded demo set: crops of the real photos that ship inside scikit-image.

Calibration and evaluation crops never come from the same source photo (the two motorcycle
views are one scene, so both sit on the calibration side)."""

from __future__ import annotations

import importlib.util
import os

from PIL import Image, ImageOps

from ..errors import Sub8Error

CALIB_SOURCES = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                 "motorcycle_right.png", "camera.png", "grass.png", "gravel.png", "brick.png",
                 "moon.png")
EVAL_SOURCES = ("chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "coins.png",
                "clock_motion.png", "cell.png")
DEMO_SET_VERSION = 1  # bump when the crops change, so that cached sets are rebuilt
CALIB_CROPS = 8
EVAL_CROPS = 10


def skimage_data_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise Sub8Error("the demo photos ship with scikit-image: pip install scikit-image")
    return os.path.join(os.path.dirname(spec.origin), "data")


def crops(image: Image.Image, n: int) -> list[Image.Image]:
    """n deterministic crops: the whole photo, then smaller windows at spread positions,
    every other one mirrored."""
    w, h = image.size
    out = []
    for i in range(n):
        scale = (1.0, 0.85, 0.7, 0.55, 0.45)[i % 5]
        cw, ch = int(w * scale), int(h * scale)
        fx, fy = ((i * 0.37) % 1.0, (i * 0.61) % 1.0)
        x0, y0 = int((w - cw) * fx), int((h - ch) * fy)
        crop = image.crop((x0, y0, x0 + cw, y0 + ch))
        out.append(ImageOps.mirror(crop) if i % 2 else crop)
    return out


def build_demo_set(out_dir: str) -> tuple[str, str]:
    """Write calib/ and eval/ crops under out_dir (once); return the two folder paths."""
    calib_dir, eval_dir = os.path.join(out_dir, "calib"), os.path.join(out_dir, "eval")
    done = os.path.join(out_dir, ".complete")
    if os.path.exists(done):
        return calib_dir, eval_dir
    src = skimage_data_dir()
    for folder, sources, n in ((calib_dir, CALIB_SOURCES, CALIB_CROPS), (eval_dir, EVAL_SOURCES, EVAL_CROPS)):
        os.makedirs(folder, exist_ok=True)
        for name in sources:
            with Image.open(os.path.join(src, name)) as im:
                image = im.convert("RGB")
            stem = os.path.splitext(name)[0]
            for i, crop in enumerate(crops(image, n)):
                crop.save(os.path.join(folder, f"{stem}_{i:02d}.png"))
    open(done, "w").close()
    return calib_dir, eval_dir
