"""Datasets and the resumable, deterministic batch order.

Sources (`data.source`):
- `embedded`: the Fashion-MNIST subset shipped in core/assets (10k train / 2k test), no network;
- `fashion_mnist`: the full set from IDX files (Debian's dataset-fashion-mnist puts them in
  /usr/share/datasets/fashion-mnist);
- `imagefolder`: an ImageNet-layout tree, `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/...`.

Every pre-training sample is augmented (RandomResizedCrop + horizontal flip, as MAE/MCM do) under a
seed derived from (run seed, epoch, sample index). A sample's augmentation therefore does not depend on
worker count, prefetching or on where a resumed job restarts: the batch order of step s is a pure function
of the seed and s, which is what lets a requeued job end bit-for-bit where an uninterrupted one would.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

EMBEDDED = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"


@dataclass
class Split:
    """A split as a dataset of (uint8 CHW tensor or PIL image, label)."""
    dataset: Dataset
    num_classes: int


class TensorImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1)  # [N, 1, H, W] uint8
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(root: str, split: str) -> TensorImages:
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [Path(root) / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        path = next((c for c in cands if c.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"data.root={root}: no {prefix}-{kind}[.gz] there. Install the full Fashion-MNIST with "
                "`apt-get install dataset-fashion-mnist` or point data.root at the IDX files.")
        found[kind] = _read_idx(path)
    return TensorImages(found["images-idx3-ubyte"], found["labels-idx1-ubyte"])


def load_split(cfg, split: str) -> Split:
    """cfg: the `data` group. split: 'train' or 'test'. Applies data.{train,test}_limit if set."""
    if cfg.source == "embedded":
        arrays = np.load(EMBEDDED)
        ds = TensorImages(arrays[f"{split}_images"], arrays[f"{split}_labels"])
    elif cfg.source == "fashion_mnist":
        ds = _fashion_mnist(cfg.root, split)
    elif cfg.source == "imagefolder":
        from torchvision.datasets import ImageFolder
        folder = Path(cfg.root) / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root={cfg.root}: expected an ImageNet layout with {folder}/<class>/")
        ds = ImageFolder(str(folder))
    else:
        raise ValueError(f"data.source={cfg.source!r} is unknown; use embedded, fashion_mnist or imagefolder")
    limit = cfg.get(f"{split}_limit")
    if limit and limit < len(ds):
        # Evenly spaced, so a small limit still covers every class of a class-sorted folder.
        ds = torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, limit).astype(int).tolist())
    return Split(ds, cfg.num_classes)


def _to_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    from torchvision.transforms.v2.functional import pil_to_tensor
    return pil_to_tensor(img.convert("RGB") if getattr(img, "mode", "RGB") not in ("RGB", "L") else img)


class Augmented(Dataset):
    """Pre-training view: item (index, sample_seed) -> (float image in [0, 1], label)."""

    def __init__(self, base: Dataset, input_size: int, crop_scale=(0.2, 1.0), hflip: bool = True):
        from torchvision.transforms import v2
        self.base = base
        ops = [v2.RandomResizedCrop(input_size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(_to_tensor(img)), label


class Plain(Dataset):
    """Evaluation view: resize (shorter side, then centre crop) to the input size, float in [0, 1]."""

    def __init__(self, base: Dataset, input_size: int):
        from torchvision.transforms import v2
        self.base = base
        self.transform = v2.Compose([v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size),
                                     v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        return self.transform(_to_tensor(img)), label


class ResumableBatchSampler(Sampler):
    """Batches of (index, sample_seed) for global steps [start_step, total): epoch e's order is a
    permutation drawn from (seed, e); rank r of a world of w takes every w-th sample of it."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch, self.seed = num_samples, batch_size, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world_size
        self.steps_per_epoch = (num_samples // world_size) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"pretrain.batch_size={batch_size} is larger than the {num_samples} training "
                             f"images per process; lower it or use more data")

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        step = self.start
        while step < self.total:
            epoch, first = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank:: self.world]
            for b in range(first, self.steps_per_epoch):
                if step >= self.total:
                    return
                ids = order[b * self.batch: (b + 1) * self.batch].tolist()
                yield [(i, (self.seed * 7_919 + epoch) * 10_000_019 + i) for i in ids]
                step += 1


def pretrain_loader(split: Split, cfg_data, input_size: int, batch_size: int, seed: int, start_step: int,
                    total_steps: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    view = Augmented(split.dataset, input_size, cfg_data.crop_scale, cfg_data.hflip)
    sampler = ResumableBatchSampler(len(view), batch_size, seed, start_step, total_steps, rank, world_size)
    # A private generator: creating the iterator must not draw from the global RNG, whose state the
    # checkpoint restores (else a resumed job's masks would shift by one draw).
    return DataLoader(view, batch_sampler=sampler, num_workers=cfg_data.num_workers, generator=torch.Generator(),
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def eval_loader(split: Split, cfg_data, input_size: int, batch_size: int) -> DataLoader:
    return DataLoader(Plain(split.dataset, input_size), batch_size=batch_size, shuffle=False,
                      num_workers=cfg_data.num_workers)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    return max((num_samples // world_size) // batch_size, 1)

