"""The `seg_linear` protocol: a dense linear probe on frozen patch tokens, scored by mIoU.

Probe: BatchNorm2d without affine + 1x1 conv over the [D, h, w] grid of patch tokens of block
`evaluate.seg_linear.layer`, logits upsampled bilinearly to the label size, per-pixel cross-entropy
(AdamW, cosine). Features of `train_limit` training images are extracted once and kept on the device.
mIoU: a confusion matrix over the test split, IoU per class present in labels or predictions, averaged.

Data with per-pixel labels:
- Fashion-MNIST (embedded or full): label = garment class + 1 on foreground pixels (pixel value above
  `fg_threshold` x 255), 0 on background; so 11 classes. A probe has to recognise the garment at every
  pixel, not only find the silhouette.
- Folders (`evaluate.seg_linear.root`) in either standard layout, images resized to the model's input
  size (labels with nearest neighbour):
  - PascalVOC: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette indices, 255 = ignore),
    `ImageSets/Segmentation/{train,val}.txt`;
  - ADE20K (ADEChallengeData2016): `images/{training,validation}/*.jpg`,
    `annotations/{training,validation}/*.png` (0 = "other" is ignored, classes 1..150 become 0..149).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from core.training.data import loader_workers
from core.evaluation.common import normalise, progress, tokens_at, warmup_cosine

IGNORE = 255


def fmnist_labels(imgs: torch.Tensor, classes: torch.Tensor, threshold: float) -> torch.Tensor:
    """imgs [B, 1, H, W] in [0, 1], classes [B] -> per-pixel labels [B, H, W]: class + 1 where the pixel
    is above threshold, else 0."""
    fg = imgs[:, 0] > threshold
    return torch.where(fg, classes.view(-1, 1, 1) + 1, torch.zeros_like(fg, dtype=torch.long))


def detect_layout(root: Path) -> str:
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    raise FileNotFoundError(f"evaluate.seg_linear.root={root}: neither a PascalVOC layout (JPEGImages/, "
                            "SegmentationClass/) nor an ADE20K one (images/, annotations/)")


class SegFolder(Dataset):
    """(float image [C, S, S] in [0, 1], labels [S, S] long with IGNORE) from a VOC or ADE20K folder."""

    def __init__(self, root, split: str, size: int, layout: str = "auto", channels: int = 3):
        root = Path(root)
        self.layout = detect_layout(root) if layout == "auto" else layout
        self.size, self.channels = size, channels
        if self.layout == "voc":
            ids = (root / "ImageSets" / "Segmentation" / f"{'train' if split == 'train' else 'val'}.txt").read_text().split()
            self.items = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        else:
            sub = "training" if split == "train" else "validation"
            self.items = [(p, root / "annotations" / sub / f"{p.stem}.png")
                          for p in sorted((root / "images" / sub).glob("*.jpg"))]
        if not self.items:
            raise FileNotFoundError(f"evaluate.seg_linear.root={root}: no {split} images in the {self.layout} layout")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        img_path, lab_path = self.items[i]
        img = Image.open(img_path).convert("RGB" if self.channels == 3 else "L").resize((self.size, self.size), Image.BILINEAR)
        lab = np.array(Image.open(lab_path).resize((self.size, self.size), Image.NEAREST), dtype=np.int64)
        if self.layout == "ade20k":  # 0 = "other": ignored; 1..150 -> 0..149
            lab = np.where(lab == 0, IGNORE, lab - 1)
        x = torch.from_numpy(np.array(img, dtype=np.float32) / 255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return x, torch.from_numpy(lab)


class _FmnistSeg(Dataset):
    def __init__(self, split, input_size: int, threshold: float):
        from core.training.data import Plain
        self.view, self.threshold = Plain(split.dataset, input_size), threshold

    def __len__(self):
        return len(self.view)

    def __getitem__(self, i):
        img, y = self.view[i]
        return img, fmnist_labels(img[None], torch.as_tensor(y).view(1), self.threshold)[0]


def seg_dataset(cfg, split, name: str) -> tuple[Dataset, int]:
    """-> (dataset of (image, labels), number of classes) for a split ('train' / 'test')."""
    s = cfg.evaluate.seg_linear
    if cfg.data.source in ("embedded", "fashion_mnist"):
        return _FmnistSeg(split, cfg.model.input_size, s.fg_threshold), split.num_classes + 1
    return SegFolder(s.root, name, cfg.model.input_size, s.layout, cfg.data.channels), int(s.num_classes)


def limited(ds: Dataset, limit) -> Dataset:
    if limit and limit < len(ds):  # evenly spaced: covers a class-sorted set
        return torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, limit).astype(int).tolist())
    return ds


@torch.no_grad()
def patch_features(encoder, ds: Dataset, cfg, device, desc: str):
    """-> (features [N, D, h, w] on device, labels [N, H, W] uint8 on device)."""
    encoder.eval()
    layer = cfg.evaluate.seg_linear.layer % encoder.depth
    g = encoder.grid
    feats, labels = [], []
    loader = DataLoader(ds, batch_size=cfg.evaluate.batch_size, shuffle=False, num_workers=loader_workers(cfg.data))
    with progress(len(ds), desc) as bar:
        for imgs, lab in loader:
            t = tokens_at(encoder, normalise(imgs, cfg, device), [layer])[layer][:, encoder.num_prefix:]
            feats.append(t.float().transpose(1, 2).reshape(len(t), -1, g, g))
            labels.append(lab.to(device, torch.uint8))
            bar.update(len(lab))
    return torch.cat(feats), torch.cat(labels)


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU (%) over the classes present in target or prediction; IGNORE pixels are left out."""
    keep = target != IGNORE
    conf = torch.bincount(target[keep].long() * num_classes + pred[keep].long(),
                          minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    return 100.0 * (inter[union > 0] / union[union > 0]).mean().item()


def run(encoder, cfg, train_split, test_split, device) -> dict:
    s = cfg.evaluate.seg_linear
    train_ds, nc = seg_dataset(cfg, train_split, "train")
    test_ds, _ = seg_dataset(cfg, test_split, "test")
    train_f, train_l = patch_features(encoder, limited(train_ds, s.train_limit), cfg, device, "seg features (train)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = nn.Sequential(nn.BatchNorm2d(train_f.shape[1], affine=False), nn.Conv2d(train_f.shape[1], nc, 1)).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=s.lr, weight_decay=0.0)
    n, batch = len(train_f), min(s.batch_size, len(train_f))
    spe = max(n // batch, 1)
    total = s.epochs * spe
    gen = torch.Generator().manual_seed(cfg.seed)
    size = train_l.shape[-2:]
    probe.train()
    step = 0
    with progress(total, "seg probe") as bar:
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for b in range(spe):
                ids = order[b * batch:(b + 1) * batch]
                for g in opt.param_groups:
                    g["lr"] = s.lr * warmup_cosine(step, total, 0)
                logits = F.interpolate(probe(train_f[ids]), size=size, mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, train_l[ids].long(), ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
    del train_f, train_l
    probe.eval()
    preds, targets = [], []
    with torch.no_grad():
        test_f, test_l = patch_features(encoder, test_ds, cfg, device, "seg features (test)")
        for i in range(0, len(test_f), batch):
            logits = F.interpolate(probe(test_f[i:i + batch]), size=size, mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1).to(torch.uint8))
            targets.append(test_l[i:i + batch])
    return {"seg_miou": miou(torch.cat(preds), torch.cat(targets), nc)}
