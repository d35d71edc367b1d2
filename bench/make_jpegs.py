"""An ImageNet-layout tree of JPEGs, made offline, for timing the ImageFolder input pipeline.

    python bench/make_jpegs.py /tmp/jpegs --count 2000           # 500x375 px, quality 90, 10 classes
    python bench/throughput.py --loader --models vit_tiny \
        --override data.root=/tmp/jpegs --override data.num_workers=2

Each image is an embedded Fashion-MNIST image scaled up to the size asked for, in colour (a random gain per
channel), over a smooth random gradient, with Gaussian noise (sigma 12): JPEGs of ~65 KB at 500x375 and
quality 90 (ImageNet's training JPEGs average ~110 KB), textured enough that decoding is real work, unlike
flat synthetic pictures. `train/` and `val/` get the same class folders (val a tenth of the count).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo(gray: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A [28, 28] uint8 image -> [height, width, 3] uint8."""
    up = F.interpolate(torch.from_numpy(gray).float()[None, None], size=(height, width), mode="bicubic",
                       align_corners=False)[0, 0].numpy()
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-60, 60, 2).tolist() + [rng.uniform(40, 160)]
        out[..., c] = base + a * yy + b * xx + rng.uniform(0.3, 1.0) * up
    out += rng.normal(0, 12, out.shape)
    return out.clip(0, 255).astype(np.uint8)


def make(root: Path, count: int, height: int, width: int, quality: int, seed: int) -> list[Path]:
    from PIL import Image

    from core.training.data import EMBEDDED
    arrays = np.load(EMBEDDED)
    images, labels = arrays["train_images"], arrays["train_labels"]
    rng = np.random.default_rng(seed)
    written = []
    for split, n in (("train", count), ("val", max(count // 10, 10))):
        for i in range(n):
            k = i % len(images)
            folder = root / split / f"class_{int(labels[k]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{split}_{i:06d}.JPEG"
            Image.fromarray(photo(images[k], height, width, rng)).save(path, quality=quality)
            written.append(path)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="where to write <root>/train/<class>/*.JPEG and <root>/val/...")
    ap.add_argument("--count", type=int, default=2000, help="training images (val gets a tenth)")
    ap.add_argument("--size", default="500x375", help="WIDTHxHEIGHT (default 500x375, a typical ImageNet photo)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.root.exists() and any(args.root.iterdir()):
        sys.exit(f"{args.root} is not empty; give a new folder")
    files = make(args.root, args.count, height, width, args.quality, args.seed)
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} JPEGs of {width}x{height} in {args.root} ({size / len(files) / 1024:.0f} KB each on average)")


if __name__ == "__main__":
    main()
