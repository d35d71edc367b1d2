"""Histograms of oriented gradients (HOG) as one batched torch op: MaskFeat-style regression targets.

MaskFeat (and SemanticMIM's MaskFeat baseline) regresses, for every masked patch, the orientation
histograms of the cells inside it: 9 unsigned bins, 8x8-pixel cells, each channel on its own. This module
computes them for a whole batch on the batch's device, so the target costs no data-loader work.

The numbers are those of `skimage.feature.hog(channel, orientations=bins, pixels_per_cell=(c, c),
cells_per_block=(1, 1), block_norm='L2', feature_vector=False)` run on each channel, because that is
a reference anyone can check (tests/test_hog.py does). The facts reproduced from it:

- gradients are central differences ([-1, 0, 1]) inside the image and exactly 0 on the first and last
  row (for the row gradient) and column (for the column gradient): no padding of the image;
- orientation = atan2(g_row, g_col) in degrees, modulo 180 (unsigned); bin i holds [i, i+1) * 180/bins;
- a cell's histogram is the magnitude-weighted vote of its pixels divided by the cell's pixel count;
  pixels beyond the last whole cell are ignored;
- each cell is divided by sqrt(sum of its squared bins + 1e-10) (L2 with eps = 1e-5, squared).

Unlike skimage on a multichannel image (which keeps, per pixel, the channel with the strongest
gradient), channels stay separate, as MaskFeat does for RGB. MaskFeat's own layer (SlowFast's
`HOGLayerC`) differs in ways we leave out on purpose, for a target anyone can check against skimage: a
Sobel kernel on a reflect-padded image, an optional Gaussian window over each cell, and L2 normalisation
over all the cells of a patch rather than per cell.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.vit import patchify

EPS = 1e-5  # skimage's block-normalisation eps; it enters squared, under the square root


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, H, W] -> (g_row, g_col), each [B, C, H, W], zero on the borders they cannot reach."""
    # Central differences on the interior only, then zero-padded: a padded *image* would instead give
    # the border pixels a one-sided gradient, which is not what the reference does.
    g_row = F.pad(x[:, :, 2:, :] - x[:, :, :-2, :], (0, 0, 1, 1))
    g_col = F.pad(x[:, :, :, 2:] - x[:, :, :, :-2], (1, 1, 0, 0))
    return g_row, g_col


@torch.no_grad()
def hog(imgs: torch.Tensor, cell_size: int = 8, bins: int = 9) -> torch.Tensor:
    """Per-channel HOG of a batch: imgs [B, C, H, W] in [0, 1] -> [B, C, H//cell, W//cell, bins] float32.

    Each cell's histogram is L2-normalised (an all-flat cell stays all zero).
    """
    if imgs.dim() != 4:
        raise ValueError(f"hog expects images [B, C, H, W], got shape {tuple(imgs.shape)}.")
    B, C, H, W = imgs.shape
    nh, nw = H // cell_size, W // cell_size
    if nh == 0 or nw == 0:
        raise ValueError(f"hog: images of {H}x{W} px hold no whole cell of cell_size={cell_size} px.")
    # float32 throughout: bins are hard thresholds, but no edge of the 9 default bins (20, 40, ... degrees)
    # has a rational tangent, so 8-bit images never come within float32 rounding of one (measured: 0 of
    # 11.8M pixels of Fashion-MNIST train and 6 skimage.data images change bin against float64).
    x = imgs.float()
    g_row, g_col = _gradients(x)  # [B, C, H, W] each
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0  # [B, C, H, W] in [0, 180]
    # floor(o / width) is the bin of [i*width, (i+1)*width); the clamp keeps in the last bin an angle just
    # below 0, which `% 180` can round up to exactly 180.0.
    index = torch.div(orientation, 180.0 / bins, rounding_mode="floor").long().clamp_(0, bins - 1)

    # Gather every cell's pixels onto one axis, then vote bin by bin: no loop over pixels or cells. A
    # scatter_add_ would do it in one call, but on CUDA it sums with atomics (order-dependent results,
    # and an error under torch.use_deterministic_algorithms); 9 masked sums are deterministic everywhere.
    def cells(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, nh, nw, cell*cell]
        t = t[:, :, : nh * cell_size, : nw * cell_size]
        t = t.reshape(B, C, nh, cell_size, nw, cell_size).permute(0, 1, 2, 4, 3, 5)
        return t.reshape(B, C, nh, nw, cell_size * cell_size)

    index, magnitude = cells(index), cells(magnitude)
    hist = torch.stack([(magnitude * (index == i)).sum(dim=-1) for i in range(bins)], dim=-1)  # [B, C, nh, nw, bins]
    hist /= cell_size * cell_size  # skimage's vote is the cell's mean magnitude
    hist = hist / torch.sqrt((hist * hist).sum(dim=-1, keepdim=True) + EPS**2)
    return hist


@torch.no_grad()
def hog_patch_targets(imgs: torch.Tensor, patch_size: int, cell_size: int = 8, bins: int = 9) -> torch.Tensor:
    """HOG targets per patch: imgs [B, C, H, W] -> [B, N, C * (patch_size // cell_size)**2 * bins].

    Patches come in `core.vit.patchify` order (row-major over the patch grid, N = (H//p) * (W//p)); inside a
    patch the layout mirrors patchify's (cell row, cell column, channel), each with its `bins` values.
    """
    if patch_size % cell_size != 0:
        raise ValueError(
            f"hog_patch_targets: patch_size={patch_size} is not a multiple of cell_size={cell_size}; "
            f"each patch must hold whole HOG cells (e.g. cell_size=8 for patch 16, 4 for patch 4 or 8)."
        )
    B, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"hog_patch_targets: images of {H}x{W} px do not split into patches of {patch_size} px.")
    h = hog(imgs, cell_size, bins)  # [B, C, nh, nw, bins]
    nh, nw = h.shape[2:4]
    # As a [B, C*bins, nh, nw] "image" of cells, a patch is a (p/cell)x(p/cell) block of cells, so
    # patchify gives the same patch order and within-patch layout as for pixels.
    grid = h.permute(0, 1, 4, 2, 3).reshape(B, C * bins, nh, nw)
    return patchify(grid, patch_size // cell_size)
