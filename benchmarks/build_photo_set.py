"""Build the benchmark photo set from photos that ship in Debian and pip packages.

Sources (all real photographs or photo-like images, nothing downloaded):
  - GNOME and MATE wallpapers (Debian gnome-backgrounds, mate-backgrounds): large photos, many
    224-ish crops each;
  - Tux Paint stamps, categories animals and food (Debian tuxpaint-stamps-default): photos of
    single objects on transparent backgrounds, pasted on plain backgrounds (ImageNet-like);
  - scikit-image's bundled photos.
Every source file goes wholly to calibration or wholly to evaluation (a stable hash of its path
decides), so the two sets never share a source. The manifest records how many evaluation images
the float MobileNetV2 is confident on (top probability >= 0.5).

    python benchmarks/build_photo_set.py --out data/bench-photos
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import sys

from PIL import Image, ImageOps

WALLPAPERS = ("/usr/share/backgrounds/gnome", "/usr/share/backgrounds/mate")
STAMPS = ("/usr/share/tuxpaint/stamps/animals", "/usr/share/tuxpaint/stamps/food")
BACKGROUNDS = ((245, 245, 245), (200, 200, 200), (120, 120, 120), (235, 225, 205), (190, 210, 230),
               (200, 225, 190), (40, 40, 40))


def files(roots, exts=(".jpg", ".jpeg", ".png", ".webp")):
    out = []
    for root in roots:
        out += [p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                if p.lower().endswith(exts) and "/cartoon/" not in p]
    return sorted(out)


def side(path: str, eval_share: float) -> str:
    h = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_share else "calib"


def wallpaper_crops(image: Image.Image, n: int, rng: random.Random):
    w, h = image.size
    for _ in range(n):
        size = int(min(w, h) * rng.uniform(0.25, 0.9))
        x0, y0 = rng.randint(0, w - size), rng.randint(0, h - size)
        crop = image.crop((x0, y0, x0 + size, y0 + size)).resize((256, 256), Image.BICUBIC)
        yield ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def stamp_composites(stamp: Image.Image, n: int, rng: random.Random):
    stamp = stamp.convert("RGBA")
    for _ in range(n):
        canvas = Image.new("RGB", (256, 256), rng.choice(BACKGROUNDS))
        scale = rng.uniform(0.55, 0.9) * 256 / max(stamp.size)
        s = stamp.resize((max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            s = ImageOps.mirror(s)
        x0, y0 = rng.randint(0, 256 - s.width), rng.randint(0, 256 - s.height)
        canvas.paste(s, (x0, y0), s)
        yield canvas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/bench-photos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-confidence", action="store_true", help="skip counting confident images")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from sub8.data.demo import skimage_data_dir

    wallpapers, stamps = files(WALLPAPERS), files(STAMPS)
    if not wallpapers or not stamps:
        print("missing photos: apt-get install gnome-backgrounds mate-backgrounds tuxpaint-stamps-default",
              file=sys.stderr)
        return 1
    skimage_photos = [os.path.join(skimage_data_dir(), n) for n in
                      ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                       "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png")]
    rng = random.Random(args.seed)
    counts = {"calib": 0, "eval": 0}
    sources = {"calib": [], "eval": []}
    jobs = ([(p, "wallpaper", 12) for p in wallpapers] + [(p, "stamp", 3) for p in stamps]
            + [(p, "skimage", 8) for p in skimage_photos])
    for path, kind, n in jobs:
        where = side(path, eval_share=0.62)
        folder = os.path.join(args.out, where, kind)
        os.makedirs(folder, exist_ok=True)
        with Image.open(path) as im:
            im.load()
            image = im.copy()
        gen = stamp_composites(image, n, rng) if kind == "stamp" else wallpaper_crops(image.convert("RGB"), n, rng)
        stem = hashlib.sha256(path.encode()).hexdigest()[:8] + "_" + os.path.splitext(os.path.basename(path))[0]
        for i, img in enumerate(gen):
            img.save(os.path.join(folder, f"{stem}_{i:02d}.jpg"), quality=92)
            counts[where] += 1
        sources[where].append(path)
    manifest = {"calib_images": counts["calib"], "eval_images": counts["eval"],
                "calib_sources": sources["calib"], "eval_sources": sources["eval"], "seed": args.seed}
    assert not set(sources["calib"]) & set(sources["eval"])
    if not args.no_confidence:
        from sub8.data import load_images
        from sub8.evaluate import predict
        from sub8.zoo import load_model
        loaded = load_model("zoo:mobilenet_v2")
        evals = load_images(os.path.join(args.out, "eval"), loaded.transform)
        probs = predict(loaded.module, evals.images).softmax(1).max(1).values
        manifest["eval_confident_mobilenet_v2"] = int((probs >= 0.5).sum())
    with open(os.path.join(args.out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    print(f"{args.out}: {counts['calib']} calibration and {counts['eval']} evaluation images "
          f"from {len(sources['calib'])} / {len(sources['eval'])} source files"
          + (f"; {manifest['eval_confident_mobilenet_v2']} evaluation images are confident for "
             f"MobileNetV2 (top probability >= 0.5)" if "eval_confident_mobilenet_v2" in manifest else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
