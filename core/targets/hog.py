"""MaskFeat's histograms of oriented gradients (HOG) as one batched torch op: the regression target of
MaskFeat and of SemanticMIM's MaskFeat variant.

The definition is that of the official generator (mmpretrain's `HOGGenerator`, which SemanticMIM's code
uses; it is SlowFast's `HOGLayerC` with a Gaussian window), for every channel c of an image I:

- gradients: I reflect-padded by one pixel, then the Sobel kernel as a cross-correlation,
    gx(y, x) = sum_i w_i [I(y+i, x-1) - I(y+i, x+1)],   gy(y, x) = sum_j w_j [I(y-1, x+j) - I(y+1, x+j)],
  i, j in {-1, 0, 1}, w = (1, 2, 1): left minus right and top minus bottom (both signs flipped from the
  textbook derivative, which an unsigned orientation does not see);
- orientation bin: floor(atan2(gx, gy) / pi * bins) mod bins -- unsigned, `bins` bins of 180/bins degrees,
  angle measured from the image's vertical axis (atan2(gx, gy), not atan2(gy, gx)), hard assignment;
- vote: the magnitude sqrt(gx^2 + gy^2) times a Gaussian window of `window` px (std window // 2,
  normalised to sum 1) tiled over the image, one window per patch; summed per `cell` x `cell` cell;
- normalisation: each cell's histogram, per channel, divided by max(its L2 norm, 1e-12) (F.normalize).

Channels stay separate (3 x 9 bins per RGB cell). What the official code leaves to float rounding is
computed exactly here, on the image's 8-bit values (x 255, rounded), where every gradient is an integer
that float32 holds exactly:
- its input is the ImageNet-normalised image, whose crops were made on uint8 images: 8-bit values under a
  per-channel affine map, which scales a channel's gradients and magnitudes alike and so changes no
  histogram. On the 8-bit values themselves, nothing is rounded;
- an edge along an axis has gx (or gy) exactly 0; float residue of either sign (the normalised image's
  values are not exact) puts such a pixel in bin 0 or bin 8 at random, on an exact integer never;
- a flat cell (every gradient 0) has the zero histogram, which normalisation keeps at 0. The official
  convolution on a normalised flat region leaves residue (~1e-7) that normalisation blows up to a unit
  vector whose bin depends on the backend; here such a cell is the definition's 0.
The images this sees are 8-bit valued on the ImageFolder path (uint8 crops, as the official pipeline's);
the embedded data's batched float crops are quantised to 8 bits for the target only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's eps, as the official generator uses it: x / max(||x||, eps)


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, H, W] -> (gx, gy), each [B, C, H, W]: the official Sobel responses on the reflect-padded image."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # Differences first, then the (1, 2, 1) smoothing across them: the same sums as the convolution.
    dx = p[..., :, :-2] - p[..., :, 2:]                       # [B, C, H+2, W]: left minus right
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    dy = p[..., :-2, :] - p[..., 2:, :]                       # [B, C, H, W+2]: top minus bottom
    gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
    return gx, gy


def gaussian_window(size: int, device=None) -> torch.Tensor:
    """[size, size] Gaussian of std size // 2 centred between the middle pixels, summing to 1."""
    n = (torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2) / (size // 2)
    w = torch.exp(-0.5 * n ** 2)
    w2 = w[:, None] * w[None, :]
    return w2 / w2.sum()


@torch.no_grad()
def hog(imgs: torch.Tensor, cell_size: int = 8, bins: int = 9, window: int = 16) -> torch.Tensor:
    """MaskFeat's per-channel HOG of a batch: imgs [B, C, H, W] in [0, 1] -> [B, C, H//cell, W//cell, bins] float32.

    `window`: the Gaussian window in px (0 = none, as SlowFast's MaskFeat); H and W must be multiples of it.
    Pixels beyond the last whole cell are not counted."""
    if imgs.dim() != 4:
        raise ValueError(f"hog expects images [B, C, H, W], got shape {tuple(imgs.shape)}.")
    B, C, H, W = imgs.shape
    nh, nw = H // cell_size, W // cell_size
    if nh == 0 or nw == 0:
        raise ValueError(f"hog: images of {H}x{W} px hold no whole cell of cell_size={cell_size} px.")
    if window and (H % window or W % window):
        raise ValueError(f"hog: images of {H}x{W} px do not tile into Gaussian windows of {window} px.")
    gx, gy = sobel(torch.round(imgs.float() * 255))  # exact integers: see the module docstring
    magnitude = torch.hypot(gx, gy)
    index = torch.floor(torch.atan2(gx, gy) / math.pi * bins).long() % bins     # [B, C, H, W] in [0, bins)
    if window:
        magnitude = magnitude * gaussian_window(window, imgs.device).repeat(H // window, W // window)

    # Every cell's pixels on one axis, then a masked sum per bin: deterministic everywhere (a scatter_add_
    # sums with atomics on CUDA, order-dependent and refused under torch.use_deterministic_algorithms).
    def cells(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, nh, nw, cell*cell]
        t = t[:, :, : nh * cell_size, : nw * cell_size]
        t = t.reshape(B, C, nh, cell_size, nw, cell_size).permute(0, 1, 2, 4, 3, 5)
        return t.reshape(B, C, nh, nw, cell_size * cell_size)

    index, magnitude = cells(index), cells(magnitude)
    hist = torch.stack([(magnitude * (index == i)).sum(dim=-1) for i in range(bins)], dim=-1)  # [B, C, nh, nw, bins]
    return F.normalize(hist, p=2, dim=-1, eps=EPS)


@torch.no_grad()
def hog_patch_targets(imgs: torch.Tensor, patch_size: int, cell_size: int = 8, bins: int = 9,
                      window: int | None = None) -> torch.Tensor:
    """HOG targets per patch, as MaskFeat lays them out: imgs [B, C, H, W] -> [B, N, C * bins * k * k],
    k = patch_size // cell_size; `window` None = one Gaussian window per patch (MaskFeat's 16 for patch 16).

    Patches are row-major over the patch grid (the order the ViT sees them); inside a patch the values are
    ordered [channel][bin][cell row][cell column], the official generator's layout."""
    if patch_size % cell_size != 0:
        raise ValueError(
            f"hog_patch_targets: patch_size={patch_size} is not a multiple of cell_size={cell_size}; "
            f"each patch must hold whole HOG cells (e.g. cell_size=8 for patch 16, 4 for patch 4 or 8)."
        )
    B, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"hog_patch_targets: images of {H}x{W} px do not split into patches of {patch_size} px.")
    h = hog(imgs, cell_size, bins, patch_size if window is None else window)     # [B, C, nh, nw, bins]
    k = patch_size // cell_size
    gh, gw = H // patch_size, W // patch_size
    h = h.permute(0, 1, 4, 2, 3).reshape(B, C * bins, gh, k, gw, k)              # [B, C*bins, gh, k, gw, k]
    return h.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * bins * k * k)
