"""HOG targets (core/targets/hog.py) agree with scikit-image's reference HOG on real images, and land per patch in
the order the ViT sees the patches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.targets.hog import hog, hog_patch_targets
from core.vit import patchify

skimage_feature = pytest.importorskip("skimage.feature", reason="pip install scikit-image (the test extra)")
skimage_data = pytest.importorskip("skimage.data")

EMBEDDED = Path(__file__).resolve().parents[1] / "core" / "assets" / "fashion_mnist_subset.npz"
# Our gradients and votes run in float32, the reference's in float64 (its per-cell sums in float32); the
# normalised bins lie in [0, 1], so float32 rounding leaves ~1e-7 (measured max 2.3e-7). A pixel put in
# the wrong bin, or a wrong border or normalisation, moves a bin by 1e-3 or more; 1e-6 separates the two.
ATOL = 1e-6


def reference(channel: np.ndarray, cell_size: int) -> np.ndarray:
    """skimage's HOG of one [H, W] channel as [H//cell, W//cell, 9] (1x1 blocks, so one cell per block)."""
    out = skimage_feature.hog(channel, orientations=9, pixels_per_cell=(cell_size, cell_size),
                              cells_per_block=(1, 1), block_norm="L2", feature_vector=False)
    return out[:, :, 0, 0, :]


def to_batch(image: np.ndarray, multiple: int) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C] -> float [1, C, H', W'] in [0, 1], cropped to a multiple of the cell."""
    x = image[..., None] if image.ndim == 2 else image
    H, W = x.shape[0] - x.shape[0] % multiple, x.shape[1] - x.shape[1] % multiple
    return torch.from_numpy(np.ascontiguousarray(x[:H, :W].transpose(2, 0, 1))).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("name", ["camera", "astronaut", "coffee"])
def test_matches_skimage_per_channel_on_photos(name):
    # coffee is 400x600: 50x75 cells, so a non-square grid is covered; camera is grayscale.
    imgs = to_batch(getattr(skimage_data, name)(), 8)
    ours = hog(imgs, cell_size=8, bins=9)
    B, C, H, W = imgs.shape
    assert ours.shape == (1, C, H // 8, W // 8, 9) and ours.dtype == torch.float32
    for c in range(C):
        # The reference gets the very float32 values we see, so only the arithmetic differs.
        ref = reference(imgs[0, c].double().numpy(), 8)
        np.testing.assert_allclose(ours[0, c].numpy(), ref, rtol=0, atol=ATOL)


def test_matches_skimage_on_fashion_mnist_batch():
    images = np.load(EMBEDDED)["train_images"][:32]  # [32, 28, 28] uint8
    imgs = torch.from_numpy(images).float().div(255).unsqueeze(1)
    ours = hog(imgs, cell_size=4)  # 7x7 cells: one per patch of vit_micro
    assert ours.shape == (32, 1, 7, 7, 9)
    ref = np.stack([reference(imgs[i, 0].double().numpy(), 4) for i in range(32)])
    np.testing.assert_allclose(ours[:, 0].numpy(), ref, rtol=0, atol=ATOL)
    # Non-trivial agreement: the garments have edges, so most cells are unit-norm histograms (eps keeps
    # the faintest cells just below 1; the flat background stays 0).
    norms = ours.norm(dim=-1)
    assert (norms > 0.99).float().mean() > 0.5 and norms.max() <= 1 + 1e-6


@pytest.mark.parametrize("cell_size,bins", [(5, 9), (6, 12), (8, 8)])
def test_matches_skimage_for_other_cells_and_bins(cell_size, bins):
    # 100 px is no multiple of these cells: the pixels past the last whole cell are ignored, as in skimage.
    imgs = torch.from_numpy(skimage_data.camera()[:100, :100]).float().div(255)[None, None]
    ours = hog(imgs, cell_size=cell_size, bins=bins)[0, 0]
    ref = skimage_feature.hog(imgs[0, 0].double().numpy(), orientations=bins,
                              pixels_per_cell=(cell_size, cell_size), cells_per_block=(1, 1),
                              block_norm="L2", feature_vector=False)[:, :, 0, 0, :]
    assert ours.shape == ref.shape == (100 // cell_size, 100 // cell_size, bins)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=ATOL)


def test_known_edge_orientation():
    # A vertical step edge has a purely horizontal gradient: angle 0, all weight in bin 0.
    imgs = torch.zeros(1, 1, 16, 16)
    imgs[..., 8:] = 1.0
    h = hog(imgs, cell_size=8)
    assert torch.allclose(h[0, 0, :, :, 0], torch.ones(2, 2), atol=1e-4)
    assert h[..., 1:].abs().max() == 0


def test_patch_targets_follow_patchify_order():
    imgs = torch.rand(2, 3, 32, 48)
    targets = hog_patch_targets(imgs, patch_size=16, cell_size=8)  # 2x3 patches of 2x2 cells
    assert targets.shape == (2, 6, 3 * 4 * 9)
    cells = hog(imgs, cell_size=8)  # [B, C, 4, 6, 9]
    # The same cells arranged as a [B, C*9, 4, 6] image and patchified 2x2: patch order and layout.
    expected = patchify(cells.permute(0, 1, 4, 2, 3).reshape(2, 27, 4, 6), 2)
    assert torch.equal(targets, expected)
    # And explicitly: patch n = (row n // 3, column n % 3) holds cells [2r:2r+2, 2c:2c+2].
    n, r, c = 4, 1, 1
    block = cells[1, :, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2]  # [C, 2, 2, 9]
    assert torch.equal(targets[1, n], block.permute(1, 2, 0, 3).reshape(-1))


def test_patch_targets_localise_an_edge():
    # Only the patch holding the edge has a non-zero target: patches are not shuffled.
    imgs = torch.zeros(1, 1, 28, 28)
    imgs[..., 8:12, 16:] = 1.0  # a horizontal bar in patch row 2 (rows 8-11), columns 4-6
    targets = hog_patch_targets(imgs, patch_size=4, cell_size=4)  # [1, 49, 9]
    active = set(torch.nonzero(targets[0].abs().sum(-1)).flatten().tolist())
    # The bar's top/bottom edges are at rows 8/11; central differences reach rows 7 and 12 too.
    rows = {n // 7 for n in active}
    cols = {n % 7 for n in active}
    assert rows == {1, 2, 3} and cols == {3, 4, 5, 6}


@pytest.mark.parametrize("patch_size,cell_size", [(16, 6), (4, 8), (12, 8)])
def test_bad_patch_cell_sizes_raise(patch_size, cell_size):
    with pytest.raises(ValueError, match=f"patch_size={patch_size}.*cell_size={cell_size}"):
        hog_patch_targets(torch.rand(1, 1, 48, 48), patch_size=patch_size, cell_size=cell_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    imgs = torch.rand(4, 3, 64, 64)
    torch.testing.assert_close(hog(imgs.cuda()).cpu(), hog(imgs), rtol=0, atol=ATOL)
