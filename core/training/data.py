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

Two paths, same rules:
- in-memory tensor datasets (embedded, fashion_mnist): `BatchAugmented` crops and flips a whole batch at
  once. Each sample's crop box follows torchvision's RandomResizedCrop (area fraction in `crop_scale`,
  log-uniform aspect ratio in (3/4, 4/3), 10 tries, then the centre-crop fallback) with uniforms from a
  counter-based hash of the sample seed (`uniforms`), and every crop is resampled by two per-sample
  matrices (rows, columns) holding torch's antialiased bilinear weights, with the flip folded into the
  column matrix: one batched matmul for the batch, equal to torchvision's resized_crop of the same box;
- ImageFolder (PIL images): `Augmented`, torchvision v2 per sample in DataLoader workers. Its crops stay
  uint8 (resampling a uint8 image rounds to uint8 anyway), so workers, pinning and the host-to-device copy
  move a quarter of float32's bytes; `to_device` scales them to [0, 1] on the device, with torchvision's
  own arithmetic (ToDtype(scale=True): float32 times 1/255), so the values are the same to the bit.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.config import check, check_in, check_number, check_pair, cpu_count

EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "fashion_mnist_subset.npz"


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


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime: float) -> str:
    """sha256 of a file's bytes (cached per size and mtime: the embedded subset is read by every run)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_files(paths: list[Path]) -> str:
    return "".join(_file_digest(str(p), p.stat().st_size, p.stat().st_mtime) for p in paths)


def describe(cfg, split: str, data: Split) -> dict:
    """What a run read of `split`, for MLflow's dataset inputs (core.tracking.log_datasets): name
    (`<data.name>-<split>`), digest (12 hex), source (the file or folder), context, and a profile. The digest
    covers the bytes of the embedded subset and of the Fashion-MNIST IDX files; for an ImageFolder tree it
    covers the sorted file names and classes, not the bytes (reading every image of ImageNet would cost more
    than the run's first epoch). The `{split}_limit` subset is part of it."""
    ds = data.dataset.dataset if isinstance(data.dataset, torch.utils.data.Subset) else data.dataset
    limit = cfg.get(f"{split}_limit")
    if cfg.source == "embedded":
        source, basis, of = EMBEDDED, _digest_files([EMBEDDED]), "file bytes"
    elif cfg.source == "fashion_mnist":
        prefix = "train" if split == "train" else "t10k"
        files = sorted(p for p in Path(cfg.root).glob(f"{prefix}-*-ubyte*"))
        source, basis, of = Path(cfg.root), _digest_files(files), "file bytes"
    else:
        source = Path(cfg.root) / ("train" if split == "train" else "val")
        names = [str(Path(p).relative_to(source)) for p, _ in getattr(ds, "samples", [])]
        basis, of = hashlib.sha256("\n".join(names).encode()).hexdigest(), "file names"
    key = f"{basis}|{split}|{limit}|{len(data.dataset)}"
    return {"name": f"{cfg.name}-{split}", "digest": hashlib.sha256(key.encode()).hexdigest()[:12],
            "source": str(Path(source).resolve()), "context": split,
            "profile": {"num_rows": len(data.dataset), "num_classes": data.num_classes, "limit": limit,
                        "digest_of": of}}


def _to_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    from torchvision.transforms.v2.functional import pil_to_tensor
    return pil_to_tensor(img.convert("RGB") if getattr(img, "mode", "RGB") not in ("RGB", "L") else img)


class Augmented(Dataset):
    """Pre-training view: item (index, sample_seed) -> (image, label); a uint8 image stays uint8 (0-255,
    see `to_device`), a float one stays float in [0, 1]."""

    def __init__(self, base: Dataset, input_size: int, crop_scale=(0.2, 1.0), hflip: bool = True,
                 interpolation: str = "bilinear", color_jitter: float | None = None):
        from torchvision.transforms import InterpolationMode, v2
        self.base = base
        # BEiT's order: colour jitter, flip, then the crop (MAE's and mmpretrain's MaskFeat: crop, then flip)
        ops = [v2.ColorJitter(color_jitter, color_jitter, color_jitter, 0)] if color_jitter else []
        crop = v2.RandomResizedCrop(input_size, scale=tuple(crop_scale), antialias=True,
                                    interpolation=InterpolationMode(interpolation))
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        self.transform = v2.Compose(ops + (flip + [crop] if color_jitter else [crop] + flip))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(_to_tensor(img)), label


RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's default, MAE's)
TRIES = 10


def uniforms(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """[N] int64 sample seeds -> [N, count] float64 uniforms in [0, 1), a pure function of each seed
    (splitmix64 of seed + counter): no generator state, so a sample's draws do not depend on its batch."""
    with np.errstate(over="ignore"):
        z = seeds.numpy().astype(np.uint64)[:, None] + np.uint64(0x9E3779B97F4A7C15) * np.arange(
            1, count + 1, dtype=np.uint64)[None, :]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def crop_params(seeds: torch.Tensor, height: int, width: int, scale=(0.2, 1.0), hflip: bool = True):
    """torchvision RandomResizedCrop.get_params for every seed at once -> (top, left, h, w, flip), each [N].

    Try t (of 10) draws an area fraction uniform in `scale` and a log-uniform aspect ratio in RATIO, keeps
    the first box that fits, placed uniformly; if none fits, the centre crop clipped to RATIO."""
    u = uniforms(seeds, 4 * TRIES + 1)
    n, area = len(seeds), height * width
    frac = scale[0] + (scale[1] - scale[0]) * u[:, 0:TRIES]
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, TRIES:2 * TRIES])
    w = torch.round(torch.sqrt(area * frac * aspect)).long()       # round half to even, as Python's round
    h = torch.round(torch.sqrt(area * frac / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)  # the first try that fits, or -1
    rows, t = torch.arange(n), first.clamp(min=0)
    h, w = h[rows, t], w[rows, t]
    top = (u[rows, 2 * TRIES + t] * (height - h + 1)).floor().long()  # randint(0, height - h + 1)
    left = (u[rows, 3 * TRIES + t] * (width - w + 1)).floor().long()
    # fallback: the whole image, clipped to the ratio range, centred
    in_ratio = width / height
    fw, fh = width, height
    if in_ratio < RATIO[0]:
        fh = int(round(fw / RATIO[0]))
    elif in_ratio > RATIO[1]:
        fw = int(round(fh * RATIO[1]))
    none = first < 0
    h, w = torch.where(none, fh, h), torch.where(none, fw, w)
    top, left = torch.where(none, (height - fh) // 2, top), torch.where(none, (width - fw) // 2, left)
    flip = (u[:, 4 * TRIES] < 0.5) if hflip else torch.zeros(n, dtype=torch.bool)
    return top, left, h, w, flip


def resample_weights(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """[N, size_out, size_in] weights of torch's antialiased bilinear resize (interpolate(...,
    antialias=True), what torchvision's resize uses) of the span [start, start + length) of an axis to
    size_out samples: a triangle filter widened by the scale when shrinking, renormalised inside the span."""
    scale = (length.double() / size_out)[:, None, None]                       # [N, 1, 1]
    support = scale.clamp(min=1.0)                                             # half-width, in input pixels
    center = start[:, None, None] + scale * (torch.arange(size_out, dtype=torch.float64)[None, :, None] + 0.5)
    k = torch.arange(size_in, dtype=torch.float64)[None, None, :]
    wts = (1 - ((k + 0.5 - center) / support).abs()).clamp(min=0)
    inside = (k >= start[:, None, None]) & (k < (start + length)[:, None, None])
    wts = wts * inside
    return (wts / wts.sum(-1, keepdim=True)).float()


def resized_crops(images: torch.Tensor, top, left, h, w, flip, size: int) -> torch.Tensor:
    """images [N, C, H, W] (uint8 or float) -> [N, C, size, size] float: each image's box resampled to
    size x size (bilinear, antialiased), mirrored where flip. One batched matmul per axis."""
    rows = resample_weights(top, h, images.shape[-2], size)                  # [N, size, H]
    cols = resample_weights(left, w, images.shape[-1], size)                 # [N, size, W]
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    x = images.float()
    return torch.einsum("noh,nchw,npw->ncop", rows, x, cols)


class BatchAugmented(Dataset):
    """Pre-training view of an in-memory uint8 image tensor: item = one batch [(index, sample_seed), ...]
    -> (float images [B, C, size, size] in [0, 1], labels [B]); use with DataLoader(batch_size=None)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_size: int, crop_scale=(0.2, 1.0),
                 hflip: bool = True):
        self.images, self.labels = images, labels
        self.size, self.scale, self.hflip = input_size, tuple(crop_scale), hflip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, batch):
        ids = torch.tensor([i for i, _ in batch])
        seeds = torch.tensor([s % 2 ** 63 for _, s in batch], dtype=torch.int64)
        imgs = self.images[ids]
        box = crop_params(seeds, imgs.shape[-2], imgs.shape[-1], self.scale, self.hflip)
        out = resized_crops(imgs, *box, self.size)
        if imgs.dtype == torch.uint8:
            out = out.div_(255.0)
        return out.clamp_(0.0, 1.0), self.labels[ids]


MAX_AUTO_WORKERS = 16  # 15 workers decoded 11,600 img/s of 500x375 JPEGs on the GPU machine (ENV.md)


def loader_workers(cfg_data) -> int:
    """`data.num_workers`: an integer >= 0 as given, or auto = the CPUs this process may use, less one for
    the process itself, at most MAX_AUTO_WORKERS. The CPUs: its affinity, capped by SLURM's
    $SLURM_CPUS_PER_TASK (a site that does not bind tasks to their CPUs still gives each its share) and by
    $MIMSWEEP_WORKER_CPUS (the threads of a local launch's worker process, cluster/local.py), then shared by
    the training processes torchrun started on this node ($LOCAL_WORLD_SIZE)."""
    w = cfg_data.get("num_workers", 0)
    if w != "auto":
        return int(w)
    cpus = cpu_count()
    for cap in ("SLURM_CPUS_PER_TASK", "MIMSWEEP_WORKER_CPUS"):
        if os.environ.get(cap, "").isdigit():
            cpus = min(cpus, int(os.environ[cap]))
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(0, min(per_process - 1, MAX_AUTO_WORKERS))


def to_device(imgs: torch.Tensor, device) -> torch.Tensor:
    """A batch from `pretrain_loader` -> float32 in [0, 1] on `device`. uint8 batches are copied as uint8
    (asynchronously from pinned memory) and scaled there exactly as torchvision's ToDtype(scale=True) does."""
    imgs = imgs.to(device, non_blocking=True)
    return imgs.to(torch.float32).mul_(1.0 / 255) if imgs.dtype == torch.uint8 else imgs


def in_memory(ds: Dataset):
    """(images [N, C, H, W], labels [N]) of a TensorImages (or a Subset of one), else None."""
    if isinstance(ds, torch.utils.data.Subset) and isinstance(ds.dataset, TensorImages):
        ids = torch.as_tensor(ds.indices)
        return ds.dataset.images[ids], ds.dataset.labels[ids]
    if isinstance(ds, TensorImages):
        return ds.images, ds.labels
    return None


class Plain(Dataset):
    """Evaluation view: resize the shorter side to `resize` (None = the input size), centre-crop the input
    size, float in [0, 1]. The official codes evaluate at 224 px from a 256 px resize, bicubic."""

    def __init__(self, base: Dataset, input_size: int, resize: int | None = None, interpolation: str = "bilinear"):
        from torchvision.transforms import InterpolationMode, v2
        self.base = base
        self.transform = v2.Compose([v2.Resize(resize or input_size, antialias=True,
                                               interpolation=InterpolationMode(interpolation)),
                                     v2.CenterCrop(input_size), v2.ToDtype(torch.float32, scale=True)])

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
    """Batches (images, labels) for global steps [start_step, total_steps): float in [0, 1], or uint8 0-255 from
    ImageFolder; `to_device` makes either float in [0, 1] on the device."""
    sampler = ResumableBatchSampler(len(split.dataset), batch_size, seed, start_step, total_steps, rank, world_size)
    workers, pin = loader_workers(cfg_data), torch.cuda.is_available()
    # A private generator: creating the iterator must not draw from the global RNG, whose state the
    # checkpoint restores (else a resumed job's masks would shift by one draw).
    tensors = in_memory(split.dataset)
    if tensors is not None:  # one vectorised crop + flip per batch; the sampler yields whole batches
        view = BatchAugmented(*tensors, input_size, cfg_data.crop_scale, cfg_data.hflip)
        return DataLoader(view, sampler=sampler, batch_size=None, num_workers=workers, pin_memory=pin,
                          generator=torch.Generator())
    view = Augmented(split.dataset, input_size, cfg_data.crop_scale, cfg_data.hflip,
                     cfg_data.get("interpolation", "bilinear"), cfg_data.get("color_jitter"))
    # The loader is iterated once for the whole run; prefetch keeps several batches decoded ahead.
    return DataLoader(view, batch_sampler=sampler, num_workers=workers, generator=torch.Generator(),
                      pin_memory=pin, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def eval_loader(split: Split, cfg_data, input_size: int, batch_size: int) -> DataLoader:
    view = Plain(split.dataset, input_size, cfg_data.get("eval_resize"), cfg_data.get("interpolation", "bilinear"))
    return DataLoader(view, batch_size=batch_size, shuffle=False,
                      num_workers=loader_workers(cfg_data), pin_memory=torch.cuda.is_available())


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    return max((num_samples // world_size) // batch_size, 1)


def check_config(cfg) -> None:
    """The `data` group (ConfigError on the first bad key)."""
    check_in(cfg, "data.source", ("embedded", "fashion_mnist", "imagefolder"))
    check_number(cfg, "data.channels", 1, integer=True)
    check(len(cfg.data.mean) == cfg.data.channels and len(cfg.data.std) == cfg.data.channels, "data.mean",
          list(cfg.data.mean), f"data.mean and data.std need data.channels={cfg.data.channels} values")
    check_pair(cfg, "data.crop_scale", lambda lo, hi: 0 < lo <= hi <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1")
    check_in(cfg, "data.interpolation", ("bilinear", "bicubic"))
    check_number(cfg, "data.color_jitter", 0, lo_open=True, optional=True)
    check_number(cfg, "data.eval_resize", cfg.model.input_size, integer=True, optional=True)
    if cfg.data.source != "imagefolder":  # the batched crops of in-memory data resample bilinearly, without jitter
        check(cfg.data.interpolation == "bilinear", "data.interpolation", cfg.data.interpolation,
              f"must be bilinear for data.source={cfg.data.source} (its crops are made a batch at a time, bilinear)",
              "Bicubic crops and colour jitter are for folder data (data=imagenet).")
        check(cfg.data.get("color_jitter") is None, "data.color_jitter", cfg.data.get("color_jitter"),
              f"must be null for data.source={cfg.data.source} (its batched crops have no colour jitter)",
              "Bicubic crops and colour jitter are for folder data (data=imagenet).")
    check(cfg.data.source != "embedded" or cfg.data.get("root") is None, "data.root", cfg.data.get("root"),
          "is not read by data.source=embedded (the images shipped in core/assets)",
          "Drop data.root, or pick data that reads it: data=fashion_mnist or data=imagenet.")
    if cfg.data.source != "embedded" and cfg.get("task", "train") == "train":  # task=flops reads no data
        root = cfg.data.root
        check(root is not None and Path(root).exists(), "data.root", root, "must be an existing folder",
              "For Fashion-MNIST: `apt-get install dataset-fashion-mnist`; for ImageNet set data.root or $IMAGENET_ROOT.")
    for split in ("train_limit", "test_limit"):
        check_number(cfg, f"data.{split}", 1, integer=True, optional=True)
    w = cfg.data.get("num_workers", 0)
    check(w == "auto" or (isinstance(w, int) and not isinstance(w, bool) and w >= 0), "data.num_workers", w,
          "must be auto or an integer >= 0 (DataLoader worker processes; 0 = load in the training process)",
          f"auto = the CPUs this process may use (shared by the node's training processes), less one, at most "
          f"{MAX_AUTO_WORKERS}.")
