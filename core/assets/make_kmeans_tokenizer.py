"""Builds `kmeans_tokenizer.pt`, the codebook of the offline BEiT-style tokenizer (see core/targets/tokenizers.py).

    python core/assets/make_kmeans_tokenizer.py [--out core/assets/kmeans_tokenizer.pt]

Deterministic: k-means (float64, fixed seed) on a fixed random sample of the patch descriptors of the
embedded TRAINING split; the test split is only read afterwards, to print how the codebook transfers.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.targets.tokenizers import (  # noqa: E402
    KMEANS_ASSET, DescriptorSettings, KMeansTokenizer, code_usage, kmeans, nearest, patch_descriptors,
)

EMBEDDED = Path(__file__).parent / "fashion_mnist_subset.npz"
GRID = 7  # vit_micro: 28 px, patch 4


def load_images(split: str) -> torch.Tensor:
    """The embedded split's images as [N, 1, 28, 28] floats in [0, 1]."""
    return torch.from_numpy(np.load(EMBEDDED)[f"{split}_images"]).float().div(255).unsqueeze(1)


def make_codebook(images01: torch.Tensor, k: int = 256, iters: int = 20, sample: int = 100_000,
                  seed: int = 0, log=print) -> dict:
    """Learn the codebook on images01 [N, 1, 28, 28] -> the asset dict (centroids, settings, how it was fit).

    `sample` descriptors are drawn without replacement (fixed seed) from all N*49 patches: enough for
    ~400 per code, and k-means on them takes seconds instead of a minute on a laptop CPU.
    """
    settings = DescriptorSettings()
    x = patch_descriptors(images01, settings).reshape(-1, settings.dim)  # [N*49, D]
    gen = torch.Generator().manual_seed(seed)
    picked = x[torch.randperm(x.shape[0], generator=gen)[:sample]]  # [sample, D]
    log(f"k-means: K={k}, {iters} iterations, on {picked.shape[0]} of {x.shape[0]} patch descriptors "
        f"(D={settings.dim}) of {images01.shape[0]} training images, seed {seed}")
    centroids = kmeans(picked, k, iters=iters, seed=seed + 1, log=log)
    return {
        "centroids": centroids.float(),  # [K, D]
        "settings": asdict(settings),
        "fit": {"k": k, "iters": iters, "sample": sample, "seed": seed, "split": "train",
                "source": EMBEDDED.name},
    }


def describe(tokenizer: KMeansTokenizer, images01: torch.Tensor, name: str, log=print) -> None:
    """Print code usage, perplexity and quantisation error of the tokenizer on a split."""
    ids = tokenizer(images01, GRID)  # [N, 49]
    used, perplexity = code_usage(ids, tokenizer.vocab_size)
    x = patch_descriptors(images01, tokenizer.settings).reshape(-1, tokenizer.settings.dim)
    _, err = nearest(x, tokenizer.centroids)
    rand = torch.randint(tokenizer.vocab_size, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    rand_err = ((x - tokenizer.centroids[rand]) ** 2).sum(-1)
    log(f"{name}: {ids.numel()} tokens, {used:.1%} of the {tokenizer.vocab_size} codes used, perplexity "
        f"{perplexity:.1f}; squared quantisation error {err.mean():.4f} (random code: {rand_err.mean():.4f}, "
        f"descriptor energy {(x ** 2).sum(-1).mean():.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=KMEANS_ASSET)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    # k-means here is thousands of small ops: with several intra-op threads on a shared CPU they wait on
    # each other (measured 2 threads on a busy 2-core box: 26 s for the k-means++ init, 1 thread: 2.3 s).
    # The result does not depend on it (float64 distances).
    torch.set_num_threads(1)
    start = time.perf_counter()
    asset = make_codebook(load_images("train"), iters=args.iters)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(asset, args.out)
    log_time = time.perf_counter() - start
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {log_time:.1f} s")
    tokenizer = KMeansTokenizer.load(args.out)
    describe(tokenizer, load_images("train"), "train")
    describe(tokenizer, load_images("test"), "test (never seen by k-means)")


if __name__ == "__main__":
    main()
