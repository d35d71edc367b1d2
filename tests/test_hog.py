"""HOG targets (core/targets/hog.py) are MaskFeat's: equal, on real images, to a reference computation written here
from the official generator's definition (mmpretrain's HOGGenerator, as SemanticMIM's code runs it), and laid
out per patch as the official code lays them out."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.targets.hog import gaussian_window, hog, hog_patch_targets

skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image (the test extra)")

EMBEDDED = Path(__file__).resolve().parents[1] / "core" / "assets" / "fashion_mnist_subset.npz"
# Ours runs in float32, the reference in float64: normalised bins lie in [0, 1], float32 rounding leaves
# ~1e-7. A pixel in another bin, a wrong border, window or normalisation moves a bin by 1e-3 or more.
ATOL = 1e-5


def reference(img: np.ndarray, cell: int = 8, bins: int = 9, window: int = 16) -> np.ndarray:
    """The official generator's definition, one pixel at a time, in float64: img [C, H, W] ->
    [C, H//cell, W//cell, bins]. Reflect padding; Sobel as cross-correlation with kernel_x =
    [[1,0,-1],[2,0,-2],[1,0,-1]], kernel_y its transpose; bin = floor(atan2(gx, gy) / pi * bins) mod bins;
    vote = magnitude x Gaussian (size `window`, std window // 2, sum 1) tiled from the top-left corner;
    per cell and channel divided by max(L2 norm, 1e-12)."""
    C, H, W = img.shape
    kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    ky = [[kx[j][i] for j in range(3)] for i in range(3)]
    if window:
        n = [(i - (window - 1) / 2) / (window // 2) for i in range(window)]
        g = [[math.exp(-0.5 * a * a) * math.exp(-0.5 * b * b) for b in n] for a in n]
        total = sum(map(sum, g))
        g = [[v / total for v in row] for row in g]
    out = np.zeros((C, H // cell, W // cell, bins))
    for c in range(C):
        pad = np.pad(img[c], 1, mode="reflect").tolist()
        for y in range(H // cell * cell):
            for x in range(W // cell * cell):
                gx = sum(kx[i][j] * pad[y + i][x + j] for i in range(3) for j in range(3))
                gy = sum(ky[i][j] * pad[y + i][x + j] for i in range(3) for j in range(3))
                b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
                w = g[y % window][x % window] if window else 1.0
                out[c, y // cell, x // cell, b] += math.hypot(gx, gy) * w
    norm = np.sqrt((out ** 2).sum(-1, keepdims=True))
    return out / np.maximum(norm, 1e-12)


def photo(name: str, top: int, left: int, size=(224, 224)) -> torch.Tensor:
    """A crop of a skimage.data photo as float [1, C, H, W] in [0, 1] (8-bit values, as a decoded JPEG)."""
    x = getattr(skimage_data, name)()
    x = x[..., None] if x.ndim == 2 else x
    x = x[top:top + size[0], left:left + size[1]]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("name,top,left,size", [("astronaut", 40, 150, (224, 224)), ("coffee", 100, 200, (224, 320)),
                                                ("chelsea", 0, 60, (224, 224)), ("camera", 150, 150, (224, 224))])
def test_matches_the_official_definition_on_photos(name, top, left, size):
    # coffee's crop is 224x320: a non-square grid (the official code assumes square images); camera is gray.
    imgs = photo(name, top, left, size)
    ours = hog(imgs, cell_size=8, bins=9, window=16)
    B, C, H, W = imgs.shape
    assert ours.shape == (1, C, H // 8, W // 8, 9) and ours.dtype == torch.float32
    ref = reference(np.round(imgs[0].double().numpy() * 255))       # the 8-bit values (the definition is scale-free)
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=ATOL)
    assert (np.abs(ref).sum(-1) > 0).mean() > 0.99          # real texture: nearly every cell has gradients


def test_matches_the_official_definition_on_fashion_mnist_with_its_flat_background():
    images = np.load(EMBEDDED)["train_images"][:16]          # [16, 28, 28] uint8
    imgs = torch.from_numpy(images).float().div(255).unsqueeze(1)
    ours = hog(imgs, cell_size=4, window=4)                   # vit_micro: one cell and one window per 4 px patch
    assert ours.shape == (16, 1, 7, 7, 9)
    ref = np.stack([reference(images[i][None].astype(np.float64), cell=4, window=4) for i in range(16)])
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=ATOL)
    # Both kinds of cell are there: flat background cells are the zero vector (0 / max(0, 1e-12)), the
    # garment's cells unit vectors.
    norms = ours.norm(dim=-1)
    flat = norms == 0
    assert 0.1 < flat.float().mean() < 0.9 and torch.allclose(norms[~flat], torch.ones(()), atol=1e-5)


def test_without_window_matches_the_definition_too():
    imgs = photo("astronaut", 200, 200, (64, 96))
    ref = reference(np.round(imgs[0].double().numpy() * 255), cell=8, window=0)
    np.testing.assert_allclose(hog(imgs, cell_size=8, window=0)[0].numpy(), ref, rtol=0, atol=ATOL)
    assert np.abs(hog(imgs, cell_size=8, window=16)[0].numpy() - ref).max() > 1e-2   # the window matters


def test_a_per_channel_affine_map_does_not_change_the_definition():
    """The official code histograms the ImageNet-normalised image, (x - mean_c) / std_c; we histogram the 8-bit
    values: the definition gives the same for any per-channel map x -> a_c x + b_c, a_c > 0 (here exact in
    float64, so no rounding hides a difference)."""
    x = np.round(photo("chelsea", 0, 0, (64, 64))[0].double().numpy() * 255)
    a, b = np.array([3.0, 0.5, 7.0]).reshape(3, 1, 1), np.array([-120.0, 17.0, -0.25]).reshape(3, 1, 1)
    np.testing.assert_allclose(reference(a * x + b), reference(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction,bin_", [("rows", 0), ("columns", 4)])
def test_orientation_convention(direction, bin_):
    # The official convention: angle from the vertical axis, atan2(gx, gy). Brightness growing down the rows
    # votes in bin 0, growing along the columns in bin 4 (the textbook atan2(gy, gx) would give 4 and 0).
    ramp = torch.arange(32, dtype=torch.float32) / 31
    imgs = (ramp.view(1, 1, 32, 1) if direction == "rows" else ramp.view(1, 1, 1, 32)).expand(1, 1, 32, 32)
    h = hog(imgs.contiguous(), cell_size=8, window=16)
    assert torch.equal(h.argmax(-1), torch.full((1, 1, 4, 4), bin_))
    assert torch.allclose(h[..., bin_], torch.ones(()), atol=1e-6)


def test_gaussian_window_is_the_official_one():
    g = gaussian_window(16)
    assert g.shape == (16, 16) and torch.isclose(g.sum(), torch.tensor(1.0))
    one_d = torch.exp(-0.5 * ((torch.arange(16) - 7.5) / 8) ** 2)     # std 16 // 2 = 8, centred at 7.5
    torch.testing.assert_close(g, torch.outer(one_d, one_d) / torch.outer(one_d, one_d).sum())


def test_patch_targets_follow_the_official_layout():
    imgs = torch.rand(2, 3, 32, 48)
    targets = hog_patch_targets(imgs, patch_size=16, cell_size=8)   # 2x3 patches of 2x2 cells
    assert targets.shape == (2, 6, 3 * 9 * 4)
    cells = hog(imgs, cell_size=8, window=16)                         # [B, C, 4, 6, 9]
    for b, n in [(0, 0), (1, 4), (1, 5)]:
        r, c = divmod(n, 3)                                           # patches row-major over the grid
        for ch in range(3):
            for k in range(9):
                for i in range(2):
                    for j in range(2):                                # [channel][bin][cell row][cell column]
                        assert targets[b, n, ((ch * 9 + k) * 2 + i) * 2 + j] == cells[b, ch, 2 * r + i, 2 * c + j, k]


def test_patch_targets_use_one_window_per_patch():
    imgs = torch.rand(1, 1, 32, 32)
    assert torch.equal(hog_patch_targets(imgs, 16, 8), hog_patch_targets(imgs, 16, 8, window=16))
    assert not torch.equal(hog_patch_targets(imgs, 16, 8), hog_patch_targets(imgs, 16, 8, window=0))


def test_patch_targets_localise_an_edge():
    # Only the patches around the edge have a non-zero target: patches are not shuffled.
    imgs = torch.zeros(1, 1, 28, 28)
    imgs[..., 8:12, 16:] = 1.0  # a horizontal bar in patch row 2 (rows 8-11), columns 4-6
    targets = hog_patch_targets(imgs, patch_size=4, cell_size=4)  # [1, 49, 9]
    active = set(torch.nonzero(targets[0].abs().sum(-1)).flatten().tolist())
    # The bar's edges are at rows 8/11 and column 16; the 3x3 kernel reaches rows 7 and 12 and column 15.
    assert {n // 7 for n in active} == {1, 2, 3} and {n % 7 for n in active} == {3, 4, 5, 6}


@pytest.mark.parametrize("patch_size,cell_size", [(16, 6), (4, 8), (12, 8)])
def test_bad_patch_cell_sizes_raise(patch_size, cell_size):
    with pytest.raises(ValueError, match=f"patch_size={patch_size}.*cell_size={cell_size}"):
        hog_patch_targets(torch.rand(1, 1, 48, 48), patch_size=patch_size, cell_size=cell_size)


def test_images_that_do_not_tile_into_windows_raise():
    with pytest.raises(ValueError, match="do not tile into Gaussian windows of 16 px"):
        hog(torch.rand(1, 1, 24, 32), cell_size=8, window=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    imgs = torch.rand(4, 3, 64, 64)
    torch.testing.assert_close(hog(imgs.cuda()).cpu(), hog(imgs), rtol=0, atol=ATOL)


def test_the_default_window_is_maskfeats_16_px_and_bad_shapes_are_refused():
    x = torch.rand(1, 1, 32, 32) * 255
    assert torch.equal(hog(x), hog(x, window=16)) and not torch.equal(hog(x), hog(x, window=32))
    with pytest.raises(ValueError, match=r"^hog expects images \[B, C, H, W\], got shape \(32, 32\)\.$"):
        hog(x[0, 0])


def test_one_cell_row_or_column_is_enough_and_images_without_a_whole_cell_or_window_are_refused():
    assert hog(torch.rand(1, 1, 8, 16) * 255, window=0).shape[2:4] == (1, 2)
    assert hog(torch.rand(1, 1, 16, 8) * 255, window=0).shape[2:4] == (2, 1)
    with pytest.raises(ValueError, match="^hog: images of 4x16 px hold no whole cell of cell_size=8 px.$"):
        hog(torch.rand(1, 1, 4, 16), window=0)
    with pytest.raises(ValueError, match="^hog: images of 24x24 px do not tile into Gaussian windows of 16 px.$"):
        hog(torch.rand(1, 1, 24, 24))
    with pytest.raises(ValueError, match=r"^hog_patch_targets: patch_size=12 is not a multiple of cell_size=8; "
                                         r"each patch must hold whole HOG cells .*\.$"):
        hog_patch_targets(torch.rand(1, 1, 24, 24), 12)
