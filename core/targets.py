"""Regression targets, computed on the intact (augmented) image of each step.

- `pixel`: the raw pixels of each patch, [B, N, p*p*C];
- `norm_pixel`: the same, normalised per patch (MAE's norm_pix_loss);
- `teacher`: the frozen teacher's final patch features on the student's grid, LayerNorm-normalised
  without affine (so the scale of the target is fixed by construction, not learnable), [B, N, T].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.config import TARGET_KINDS as KINDS  # noqa: F401 - the names validation accepts
from core.vit import patchify


def target_dim(kind: str, patch_size: int, channels: int, teacher=None) -> int:
    if kind == "teacher":
        return teacher.width
    return patch_size * patch_size * channels


@torch.no_grad()
def make_targets(kind: str, imgs: torch.Tensor, patch_size: int, teacher=None) -> torch.Tensor:
    """imgs: [B, C, H, W] in [0, 1] -> target: [B, N, T] (float32)."""
    if kind == "teacher":
        feats = teacher(imgs, grid=imgs.shape[-1] // patch_size).patch
        return F.layer_norm(feats, feats.shape[-1:])
    x = patchify(imgs.float(), patch_size)
    if kind == "norm_pixel":
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return x
