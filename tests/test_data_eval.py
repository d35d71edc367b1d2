"""Data sources, the deterministic batch order, and the two frozen-feature evaluations."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.training.data import Augmented, ResumableBatchSampler, load_split
from core.evaluation.knn import knn_top1
from core.evaluation.linear_probe import linear_top1
from tests.conftest import _need


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
    _need(root.exists(), "the full Fashion-MNIST", "apt-get install dataset-fashion-mnist (as root)")
    train = load_split(_data(source="fashion_mnist", root=str(root)), "train")
    test = load_split(_data(source="fashion_mnist", root=str(root)), "test")
    assert len(train.dataset) == 60_000 and len(test.dataset) == 10_000
    assert np.bincount(train.dataset.labels.numpy()).tolist() == [6000] * 10


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
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8    # scaled to [0, 1] on the device
    assert torch.equal(view[(0, 123)][0], img)                 # same seed, same augmentation
    assert not torch.equal(view[(0, 124)][0], img)


def test_imagefolder_batches_travel_as_uint8_and_equal_torchvisions_float_pipeline(tmp_path):
    """The loader hands over uint8; to_device's float is torchvision's RandomResizedCrop + flip +
    ToDtype(float32, scale=True) of the same sample under the same seed, to the bit."""
    from PIL import Image
    from torchvision.transforms import v2

    from core.training.data import pretrain_loader, to_device
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (45, 60, 3), np.uint8)).save(tmp_path / "train" / cls / f"{i}.jpg")
    cfg = _data(source="imagefolder", root=str(tmp_path), num_classes=2, crop_scale=[0.2, 1.0], hflip=True,
                num_workers=0)
    split = load_split(cfg, "train")
    imgs, labels = next(iter(pretrain_loader(split, cfg, 32, 8, seed=5, start_step=0, total_steps=1)))
    assert imgs.dtype == torch.uint8 and imgs.shape == (8, 3, 32, 32)
    got = to_device(imgs, torch.device("cpu"))
    assert got.dtype == torch.float32

    reference = v2.Compose([v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True)])
    batch = next(iter(ResumableBatchSampler(len(split.dataset), 8, seed=5, start_step=0, total_steps=1)))
    for k, (index, seed) in enumerate(batch):
        pil, label = split.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            want = reference(v2.functional.pil_to_tensor(pil))
        assert torch.equal(got[k], want) and labels[k] == label


def test_auto_loader_workers_follow_this_process_cpus_and_the_ranks_on_the_node(monkeypatch):
    from core.training.data import MAX_AUTO_WORKERS, loader_workers
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(12)))
    for var in ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "MIMSWEEP_WORKER_CPUS"):
        monkeypatch.delenv(var, raising=False)
    assert loader_workers(_data(num_workers="auto")) == 11          # all but one CPU for the loader
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(_data(num_workers="auto")) == 2           # 12 CPUs shared by 4 ranks: 3 each, less one
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(256)))
    assert loader_workers(_data(num_workers="auto")) == MAX_AUTO_WORKERS
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers(_data(num_workers="auto")) == 0           # one CPU: load in the training process
    assert loader_workers(_data(num_workers=3)) == 3                # an integer is taken as given
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")                  # a site that does not bind tasks to CPUs
    assert loader_workers(_data(num_workers="auto")) == 7
    monkeypatch.setenv("MIMSWEEP_WORKER_CPUS", "2")                 # one of a local launch's parallel workers
    assert loader_workers(_data(num_workers="auto")) == 1


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
    from core.training.loop import build_model, pretrain
    from tests.conftest import TINY
    from tests.test_resume import FlushedLog
    cfg = compose(*TINY, "pretrain.precision=bf16", "pretrain.max_steps=2", "method.target=norm_pixel",
                  "pretrain.grad_clip=1.0")
    model = build_model(cfg)
    before = model.encoder.patch_embed.proj.weight.clone()
    stats = pretrain(cfg, model, None, load_split(cfg.data, "train"), tmp_path / "c.pt", FlushedLog(),
                     torch.device("cpu"))
    assert stats["steps"] == 2 and not torch.equal(before, model.encoder.patch_embed.proj.weight)


# ---- batch-level augmentation of in-memory datasets (core.data.BatchAugmented) ---------------------

def _torchvision_boxes(n, height, width, scale=(0.2, 1.0)):
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    img = torch.zeros(1, height, width)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


def test_crop_boxes_follow_torchvisions_random_resized_crop_rules():
    from scipy.stats import ks_2samp
    from core.training.data import crop_params
    n, H, W = 20_000, 28, 28
    top, left, h, w, _ = crop_params(torch.arange(n) * 1_000_003 + 7, H, W, scale=(0.2, 1.0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    ours = torch.stack([top, left, h, w], 1).double()
    ref = _torchvision_boxes(n, H, W).double()
    area_ours, area_ref = ours[:, 2] * ours[:, 3] / (H * W), ref[:, 2] * ref[:, 3] / (H * W)
    # rounding to whole pixels moves a box's area and ratio by at most a pixel per side
    assert area_ours.min() >= 0.2 * (1 - 2 / 6) and (ours[:, 3] / ours[:, 2]).max() <= 4 / 3 * 1.5
    # the same distribution as torchvision's sampler: area, aspect, position, size
    for name, a, b in [("area", area_ours, area_ref), ("log aspect", (ours[:, 3] / ours[:, 2]).log(),
                       (ref[:, 3] / ref[:, 2]).log()), ("top", ours[:, 0], ref[:, 0]), ("left", ours[:, 1], ref[:, 1]),
                       ("centre x", ours[:, 1] + ours[:, 3] / 2, ref[:, 1] + ref[:, 3] / 2)]:
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, name
    # no box fits in 10 tries (a 4 x 100 strip): torchvision's fallback, the centre crop clipped to 4/3
    top, left, h, w, _ = crop_params(torch.arange(50), 4, 100)
    assert {tuple(b) for b in torch.stack([top, left, h, w], 1).tolist()} == {tuple(_torchvision_boxes(1, 4, 100)[0].tolist())}


@pytest.mark.parametrize("size", [28, 16, 64])  # same size, downscaling (antialiased), upscaling
def test_a_batch_crop_equals_torchvisions_crop_of_the_same_box(size):
    from torchvision.transforms.v2 import functional as F
    from core.training.data import crop_params, resized_crops
    imgs = load_split(_data(), "train").dataset.images[:64]
    top, left, h, w, flip = crop_params(torch.arange(64) + 99, 28, 28)
    ours = resized_crops(imgs, top, left, h, w, flip, size) / 255
    for i in range(64):
        box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
        ref = F.resized_crop(imgs[i].float() / 255, *box, [size, size], antialias=True)
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.allclose(ours[i], ref, atol=1e-5), (i, box)
        ref8 = F.resized_crop(imgs[i], *box, [size, size], antialias=True).float() / 255  # torchvision rounds to uint8
        assert (ours[i] - (ref8.flip(-1) if flip[i] else ref8)).abs().max() <= 1 / 255 + 1e-6


def test_half_the_samples_are_flipped_and_a_sample_view_ignores_its_batch():
    from core.training.data import BatchAugmented, crop_params
    n = 20_000
    flips = crop_params(torch.arange(n) * 31 + 5, 28, 28)[4].double().mean().item()
    assert abs(flips - 0.5) < 4 * (0.25 / n) ** 0.5
    assert not crop_params(torch.arange(100), 28, 28, hflip=False)[4].any()
    ds = load_split(_data(), "train").dataset
    view = BatchAugmented(ds.images, ds.labels, 28)
    batch = [(3, 1001), (7, 2002), (3, 3003)]
    imgs, labels = view[batch]
    assert imgs.shape == (3, 1, 28, 28) and imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1
    assert labels.tolist() == [ds.labels[3], ds.labels[7], ds.labels[3]]
    assert torch.equal(view[[(7, 2002)]][0][0], imgs[1])        # same (index, seed), same view, any batch
    assert not torch.equal(imgs[0], imgs[2])                    # another seed, another view


def test_the_pretrain_loader_crops_in_memory_data_per_batch():
    from core.training.data import pretrain_loader
    cfg = _data(train_limit=512, crop_scale=[0.2, 1.0], hflip=True, num_workers=0)
    split = load_split(cfg, "train")
    loader = pretrain_loader(split, cfg, 28, 64, seed=0, start_step=0, total_steps=3)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (64, 1, 28, 28)
    again = list(pretrain_loader(split, cfg, 28, 64, seed=0, start_step=2, total_steps=3))
    assert torch.equal(again[0][0], batches[2][0])             # step 2 is the same batch after a restart
