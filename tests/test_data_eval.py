"""Data sources, the deterministic batch order, and the two frozen-feature evaluations."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.data import Augmented, ResumableBatchSampler, load_split
from core.evaluate import knn_top1, linear_top1


def _data(**kw):
    base = {"source": "embedded", "root": None, "num_classes": 10, "train_limit": None, "test_limit": None}
    return OmegaConf.create({**base, **kw})


def test_embedded_subset_is_balanced_and_offline():
    train, test = load_split(_data(), "train"), load_split(_data(), "test")
    assert len(train.dataset) == 10_000 and len(test.dataset) == 2_000
    labels = train.dataset.labels.numpy()
    assert np.bincount(labels).tolist() == [1000] * 10
    img, _ = train.dataset[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8


def test_full_fashion_mnist_from_the_debian_package():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.exists():
        pytest.skip("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    split = load_split(_data(source="fashion_mnist", root=str(root)), "train")
    assert len(split.dataset) == 60_000


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split(_data(source="fashion_mnist", root=str(tmp_path)), "train")


def test_imagefolder_reads_an_imagenet_layout(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.random.randint(0, 255, (40, 50, 3), np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    split = load_split(_data(source="imagefolder", root=str(tmp_path), num_classes=2), "train")
    view = Augmented(split.dataset, input_size=32)
    img, label = view[(0, 123)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert torch.equal(view[(0, 123)][0], img)                 # same seed, same augmentation
    assert not torch.equal(view[(0, 124)][0], img)


def test_batch_order_is_a_function_of_seed_and_step():
    full = list(ResumableBatchSampler(100, 10, seed=3, start_step=0, total_steps=25))
    tail = list(ResumableBatchSampler(100, 10, seed=3, start_step=13, total_steps=25))
    assert full[13:] == tail                                    # resuming at step 13 replays the same batches
    assert sorted(i for b in full[:10] for i, _ in b) == list(range(100))  # an epoch sees every sample once
    shards = [list(ResumableBatchSampler(100, 5, seed=3, start_step=0, total_steps=10, rank=r, world_size=2))
              for r in range(2)]
    seen = [i for s in shards for b in s for i, _ in b]
    assert sorted(seen) == list(range(100))                     # ranks split an epoch without overlap


def test_knn_and_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g)
    assert knn_top1(x[:300], y[:300], x[300:], y[300:], 4) == 100.0
    assert linear_top1(x[:300], y[:300], x[300:], y[300:], 4, epochs=20) == 100.0
    noise = torch.randn(400, 16, generator=g)                   # no signal: near chance
    assert knn_top1(noise[:300], y[:300], noise[300:], y[300:], 4) < 50


def test_bf16_autocast_step_trains(compose, tmp_path):
    from core.train import build_model, pretrain
    from tests.conftest import TINY
    from tests.test_resume import FlushedLog
    cfg = compose(*TINY, "pretrain.precision=bf16", "pretrain.max_steps=2", "method.target=norm_pixel",
                  "pretrain.grad_clip=1.0")
    model = build_model(cfg)
    before = model.encoder.patch_embed.proj.weight.clone()
    stats = pretrain(cfg, model, None, load_split(cfg.data, "train"), tmp_path / "c.pt", FlushedLog(),
                     torch.device("cpu"))
    assert stats["steps"] == 2 and not torch.equal(before, model.encoder.patch_embed.proj.weight)
