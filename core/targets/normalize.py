"""Regression targets the methods build from the intact (augmented) image of each step.

- `pixel_targets`: the pixels of each patch, [B, N, p*p*C], optionally normalised per patch (MAE's
  norm_pix_loss), taken from the normalised input as MAE does;
- `normalize_features`: how teacher features become targets (`method.target_norm`):
  `layernorm` = per token, LayerNorm without affine (the default: the scale of a target is fixed by
  construction, nothing learnable can shrink it); `batchnorm` = per channel over batch and tokens, no
  affine; `batchnorm_global` = one mean and (unbiased) variance over the whole tensor, eps 1e-6 inside
  the root (the official MaskAlign code's 'bn', its Tab. 6 "BN"); `none` = raw features.
HOG targets are in core/targets/hog.py, visual tokens in core/targets/tokenizers.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.vit import patchify

FEATURE_NORMS = ("layernorm", "batchnorm", "batchnorm_global", "none")


def pixel_dim(patch_size: int, channels: int) -> int:
    return patch_size * patch_size * channels


@torch.no_grad()
def pixel_targets(x: torch.Tensor, patch_size: int, normalize: bool) -> torch.Tensor:
    """x: [B, C, H, W] (normalised input) -> [B, N, p*p*C] float32, per-patch standardised if asked."""
    t = patchify(x.float(), patch_size)
    if normalize:
        t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return t


@torch.no_grad()
def normalize_features(feats: torch.Tensor, kind: str = "layernorm") -> torch.Tensor:
    """feats: [B, N, T] -> float32 targets normalised as `kind` (see the module docstring)."""
    feats = feats.float()
    if kind == "layernorm":
        return F.layer_norm(feats, feats.shape[-1:])
    if kind == "batchnorm":
        flat = feats.reshape(-1, feats.shape[-1])
        return F.batch_norm(flat, None, None, training=True).reshape(feats.shape)
    if kind == "batchnorm_global":
        return (feats - feats.mean()) / (feats.var() + 1e-6) ** 0.5
    if kind == "none":
        return feats
    raise ValueError(f"method.target_norm={kind!r} is invalid: must be one of {', '.join(FEATURE_NORMS)}")
