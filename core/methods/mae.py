"""MAE (He et al., 2022): mask random patches, encode the visible ones, decode the rest.

Targets (`method.target`): `pixel`, `norm_pixel` (per-patch normalised, MAE's norm_pix_loss) or
`teacher` (the frozen teacher's final patch features, normalised as `method.target_norm`: the
"CLIP via patch" baseline of MCM).

Names follow the official code (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`,
`decoder_norm`, `decoder_pred`; the encoder's are timm's), so an official checkpoint loads through
`from_official_state_dict`, a pure renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.config import check, check_in, check_number
from core.methods import register
from core.methods.base import Method
from core.targets.normalize import FEATURE_NORMS, normalize_features, pixel_dim, pixel_targets
from core.vit import ViTEncoder, blocks, build_encoder, init_weights, sincos_pos_embed


def check_decoder(cfg) -> None:
    """`method.decoder_{depth,dim,heads}` of MAE-style decoders."""
    check_number(cfg, "method.decoder_depth", 1, integer=True)
    check_number(cfg, "method.decoder_dim", 1, integer=True)
    check_number(cfg, "method.decoder_heads", 1, integer=True)
    d = cfg.method
    check(d.decoder_dim % d.decoder_heads == 0, "method.decoder_dim", d.decoder_dim,
          f"must be divisible by method.decoder_heads={d.decoder_heads}")
    check(d.decoder_dim % 4 == 0, "method.decoder_dim", d.decoder_dim,
          "must be a multiple of 4 (2-D sin-cos position embedding)")


def check_teacher_target(cfg) -> None:
    if cfg.method.target == "teacher":
        check_in(cfg, "method.target_norm", FEATURE_NORMS)


def check_patch_mask_ratio(cfg) -> None:
    """A patch mask ratio in (0, 1) that leaves at least one visible patch."""
    check_number(cfg, "method.mask_ratio", 0, 1, lo_open=True, hi_open=True)
    n = (cfg.model.input_size // cfg.model.patch_size) ** 2
    check(int(n * (1 - cfg.method.mask_ratio)) >= 1, "method.mask_ratio", cfg.method.mask_ratio,
          f"must leave at least one visible patch of the {n}")


def patch_target_width(cfg, teacher=None) -> int:
    """Channels of a `pixel` / `norm_pixel` / `teacher` target per patch (MAE's and MCM's targets)."""
    return teacher.width if cfg.method.target == "teacher" else pixel_dim(cfg.model.patch_size, cfg.data.channels)


@torch.no_grad()
def patch_targets(method, imgs, x, teacher=None) -> torch.Tensor:
    """-> [B, N, T]: the teacher's features of the raw image (normalised as `method.target_norm`), or the
    pixels of the normalised image (as MAE); `method` is the built MAE / MCM / SemanticMIM."""
    enc = method.encoder
    if method.target == "teacher":
        return normalize_features(teacher(imgs, enc.grid, method.request).patch, method.target_norm)
    return pixel_targets(x, enc.patch_size, method.target == "norm_pixel")


def random_patch_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator):
    """x: [B, N, D] -> visible x: [B, K, D], mask: [B, N] (1 = dropped), ids_restore: [B, N].

    Per-sample noise; keep the K = N(1-r) lowest; a second argsort gives the way back."""
    B, N, D = x.shape
    keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_vis = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_vis, mask, ids_restore


@register
class MAE(Method):
    name = "mae"
    targets = ("pixel", "norm_pixel", "teacher")

    def __init__(self, encoder: ViTEncoder, target_dim: int, mask_ratio: float = 0.75,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0,
                 target: str = "norm_pixel", target_norm: str = "layernorm", teacher_request=None):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.target, self.target_norm, self.request = mask_ratio, target, target_norm, teacher_request
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(encoder.grid, decoder_dim))
        self.decoder_blocks = blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        init_weights(self.decoder_blocks)
        for m in (self.decoder_embed, self.decoder_pred, self.decoder_norm):
            init_weights(m)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_patch_mask_ratio(cfg)
        check_decoder(cfg)
        check_teacher_target(cfg)

    @classmethod
    def build(cls, cfg, teacher=None) -> "MAE":
        m = cfg.method
        return cls(build_encoder(cfg), patch_target_width(cfg, teacher), mask_ratio=m.mask_ratio, decoder_dim=m.decoder_dim,
                   decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, mlp_ratio=cfg.model.mlp_ratio,
                   target=m.target, target_norm=m.get("target_norm", "layernorm"),
                   teacher_request=cls.teacher_request(cfg))

    def make_targets(self, imgs, x, teacher=None) -> torch.Tensor:
        return patch_targets(self, imgs, x, teacher)

    def forward_encoder(self, imgs: torch.Tensor):
        """imgs: [B, C, H, W] -> latent: [B, 1 + K, D], mask: [B, N], ids_restore: [B, N]."""
        x = self.encoder.embed(imgs) + self.encoder.pos_embed[:, 1:]
        x, mask, ids_restore = random_patch_masking(x, self.mask_ratio, self.rng(x.device))
        latent = self.encoder.run_blocks(self.encoder.add_cls(x))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [B, 1 + K, D] -> pred: [B, N, T] (mask tokens put back at the dropped positions)."""
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    @staticmethod
    def forward_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target: [B, N, T]; mask: [B, N]. MSE averaged over the masked patches only."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor, targets: torch.Tensor):
        latent, mask, ids_restore = self.forward_encoder(x)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(pred, targets, mask), {"pred": pred, "mask": mask}


def from_official_state_dict(state: dict) -> dict:
    """An official MAE checkpoint's `model` dict (facebookresearch/mae models_mae.py names) -> ours.

    The encoder's keys are timm's there and here, under `encoder.` here; the decoder's are the same
    names. The official position tables are stored in the checkpoint and already in MAE's channel order,
    which is ours (core/vit.py), so nothing but the names changes."""
    decoder = ("decoder_", "mask_token")
    return {(k if k.startswith(decoder) else f"encoder.{k}"): v for k, v in state.items()}
