"""The ViT pieces every method shares: patchify, fixed 2-D sin-cos position embeddings, timm blocks.

Blocks are timm's `Block` (fused scaled-dot-product attention where PyTorch has it); this module only
adds what timm leaves to the caller: a [CLS] token, frozen sin-cos position embeddings, and MAE-style
initialisation (xavier_uniform for linear layers, patch projection initialised like a linear layer).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block


def sincos_pos_embed(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, [1, (1 +) grid*grid, dim]; the [CLS] slot is zeros."""
    pe = build_sincos2d_pos_embed([grid, grid], dim=dim)  # [grid*grid, dim]
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [B, C, H, W] -> patches: [B, N, p*p*C] in row-major patch order (as PatchEmbed sees them)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> nn.ModuleList:
    """A stack of timm ViT blocks with a linearly increasing drop-path rate."""
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for r in rates
    )


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier_uniform linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """Plain ViT encoder: patch embedding + [CLS] + fixed pos-emb + blocks + final norm.

    The methods call its pieces step by step (embed, then mask, then run the blocks); `features` is the
    frozen-feature path used by evaluation and by MaskAlign-style students.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim), persistent=False)
        self.blocks = blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W] -> patch embeddings without position: [B, N, D]."""
        return self.patch_embed(imgs).flatten(2).transpose(1, 2)

    def add_cls(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] (positions already added) -> [B, 1 + L, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def run_blocks(self, x: torch.Tensor, layers: list[int] | None = None):
        """x: [B, L, D] -> final normed tokens [B, L, D] (and the raw outputs of the listed blocks)."""
        taken = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if layers is not None and i in layers:
                taken.append(x)
        x = self.norm(x)
        return (x, taken) if layers is not None else x

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean", layer: int = -1) -> torch.Tensor:
        """Frozen features of intact images: [B, D], from block `layer` (-1 = last, after the norm)."""
        x = self.add_cls(self.embed(imgs) + self.pos_embed[:, 1:])
        depth = len(self.blocks)
        layer = layer % depth
        for blk in self.blocks[: layer + 1]:
            x = blk(x)
        if layer == depth - 1:
            x = self.norm(x)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)
