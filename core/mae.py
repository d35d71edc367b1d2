"""MAE (He et al., 2022): mask random patches, encode the visible ones, decode the rest.

The target is chosen by the caller (see core/targets.py): pixels, per-patch normalised pixels, or
frozen-teacher patch features. With a teacher target this is the "CLIP via patch" baseline of MCM.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.vit import ViTEncoder, blocks, init_weights, sincos_pos_embed


class MAE(nn.Module):
    def __init__(self, encoder: ViTEncoder, target_dim: int, mask_ratio: float = 0.75,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        D, N = encoder.embed_dim, encoder.num_patches
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(encoder.grid, decoder_dim), persistent=False)
        self.decoder_blocks = blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        init_weights(self.decoder_blocks)
        for m in (self.decoder_embed, self.decoder_pred, self.decoder_norm):
            init_weights(m)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, x: torch.Tensor):
        """x: [B, N, D] -> visible x: [B, K, D], mask: [B, N] (1 = dropped), ids_restore: [B, N].

        Per-sample noise; keep the K = N(1-r) lowest; a second argsort gives the way back.
        """
        B, N, D = x.shape
        keep = int(N * (1 - self.mask_ratio))
        noise = torch.rand(B, N, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_vis = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_vis, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor):
        """imgs: [B, C, H, W] -> latent: [B, 1 + K, D], mask: [B, N], ids_restore: [B, N]."""
        x = self.encoder.embed(imgs) + self.encoder.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x)
        latent = self.encoder.run_blocks(self.encoder.add_cls(x))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [B, 1 + K, D] -> pred: [B, N, T] (mask tokens put back at the dropped positions)."""
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
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

    def forward(self, imgs: torch.Tensor, target: torch.Tensor):
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(pred, target, mask), {"pred": pred, "mask": mask}
