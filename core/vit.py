"""The ViT pieces every method shares: patchify, fixed 2-D sin-cos position embeddings, timm blocks.

Blocks are timm's `Block` (fused scaled-dot-product attention where PyTorch has it). The encoder's
parameter names are timm's `VisionTransformer` names (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.i`, `norm`), so its state_dict exports to timm as it is (`timm_state_dict`) and an official MAE
checkpoint loads into it by name (core/methods/mae.py). This module adds what timm leaves to the caller: frozen
sin-cos position embeddings in MAE's channel order, and MAE-style initialisation.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn


def sincos_pos_embed(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos table, [1, (1 +) grid*grid, dim], in the official MAE channel order.

    Channel quarters: [sin(w), cos(w), sin(h), cos(h)] with w the column of a patch, frequencies
    1 / 10000^(k / (dim/4)), k = 0..dim/4-1; the [CLS] slot is zeros. (timm's build_sincos2d_pos_embed
    holds the same values as [sin(h), sin(w), cos(h), cos(w)]: an official checkpoint would not match it.)
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)        # [dim/4]
    h, w = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")                                                 # [grid, grid]
    ang_w = w.reshape(-1, 1) * omega                                                     # [N, dim/4]
    ang_h = h.reshape(-1, 1) * omega
    pe = torch.cat([ang_w.sin(), ang_w.cos(), ang_h.sin(), ang_h.cos()], dim=1).float()  # [N, dim]
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


def legacy_sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """The table mimsweep used before it followed MAE's order (timm's [sin h, sin w, cos h, cos w]):
    only for resuming checkpoints written then, which did not store the table."""
    pe = sincos_pos_embed(grid, dim, cls_token=True)
    q = dim // 4
    sin_w, cos_w, sin_h, cos_h = pe[..., :q], pe[..., q:2 * q], pe[..., 2 * q:3 * q], pe[..., 3 * q:]
    return torch.cat([sin_h, sin_w, cos_h, cos_w], dim=-1)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [B, C, H, W] -> patches: [B, N, p*p*C] in row-major patch order (as PatchEmbed sees them)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> nn.ModuleList:
    """A stack of timm ViT blocks with a linearly increasing drop-path rate."""
    # timm is imported here, not at the top: it costs ~1 s, and a launch or status.py imports this module
    # (through the method registry) without building any model
    from timm.models.vision_transformer import Block
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


class PatchEmbed(nn.Module):
    """Conv patch projection named as timm's (`patch_embed.proj`), so state_dicts map one to one."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)  # [B, N, D]


class ViTEncoder(nn.Module):
    """Plain ViT encoder: patch embedding + [CLS] + fixed pos-emb + blocks + final norm.

    The methods call its pieces step by step (embed, then mask, then run the blocks); `features` is the
    frozen-feature path used by evaluation. The position table is a persistent buffer: it is part of
    every checkpoint and export, so a reader never depends on how this code happens to build it.

    `extra_tokens` learnable tokens follow [CLS], each with a learnable position slot (trunc-normal 0.02):
    SemanticMIM's [PROXY] tokens beyond the first (the reference code makes them extra [CLS] slots);
    they stay in the encoder after pre-training and export as timm's `reg_token`s.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, extra_tokens: int = 0):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = embed_dim, depth, num_heads, mlp_ratio
        self.extra_tokens = extra_tokens
        self.num_prefix = 1 + extra_tokens
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if extra_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, extra_tokens, embed_dim))
            self.reg_pos = nn.Parameter(torch.zeros(1, extra_tokens, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim))
        self.blocks = blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if extra_tokens:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
            nn.init.trunc_normal_(self.reg_pos, std=0.02)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W] -> patch embeddings without position: [B, N, D]."""
        return self.patch_embed(imgs)

    def add_cls(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] (positions already added) -> [B, num_prefix + L, D]: [CLS] (and extra tokens) first."""
        prefix = self.cls_token + self.pos_embed[:, :1]
        if self.extra_tokens:
            prefix = torch.cat([prefix, self.reg_token + self.reg_pos], dim=1)
        return torch.cat([prefix.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(self, x: torch.Tensor, layers: list[int] | None = None):
        """x: [B, L, D] -> final normed tokens [B, L, D] (and the raw outputs of the listed blocks)."""
        taken = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if layers is not None and i in layers:
                taken.append(x)
        x = self.norm(x)
        return (x, taken) if layers is not None else x

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Intact images [B, C, H, W] -> every token after the final norm, [B, num_prefix + N, D]."""
        return self.run_blocks(self.add_cls(self.embed(imgs) + self.pos_embed[:, 1:]))

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean", layer: int = -1) -> torch.Tensor:
        """Frozen features of intact images: [B, D], from block `layer` (-1 = last, after the norm)."""
        x = self.add_cls(self.embed(imgs) + self.pos_embed[:, 1:])
        layer = layer % self.depth
        for blk in self.blocks[: layer + 1]:
            x = blk(x)
        if layer == self.depth - 1:
            x = self.norm(x)
        return x[:, 0] if pool == "cls" else x[:, self.num_prefix:].mean(dim=1)

    # ---- timm conventions: optimiser parameter groups and export
    def no_weight_decay(self) -> set[str]:
        """Names (relative to the encoder) without weight decay besides biases and norms: the position
        table is a buffer, and [CLS] is decayed, as in the official MAE (timm 0.3.2 add_weight_decay)."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-grouping convention (layer-wise lr decay): stem, then one group per block."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def timm_kwargs(self, pool: str = "mean") -> dict:
        """timm.create_model kwargs that build this architecture as a `VisionTransformer` whose pooled output
        (`model(x)`) is `self.features(x, pool)`: `mean` = timm's `avg` pool of the patch tokens after the
        final norm (`fc_norm=False` keeps timm's norm before the pool, as here), `cls` = timm's `token`."""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be mean or cls, got {pool!r}")
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    num_classes=0, global_pool="avg" if pool == "mean" else "token", fc_norm=False,
                    reg_tokens=self.extra_tokens)

    def timm_state_dict(self) -> dict:
        """This encoder as a timm `vit_*` state_dict (names are already timm's; CPU, contiguous). Extra
        tokens become timm's reg_token, their position slots join the table after [CLS]'s."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.extra_tokens:
            pos = sd.pop("pos_embed")
            sd["pos_embed"] = torch.cat([pos[:, :1], sd.pop("reg_pos"), pos[:, 1:]], dim=1)
        return sd


def block_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention weights of a timm `Block` on its input x: [B, L, D] -> [B, heads, L, L].

    Computed on the side from the block's own qkv (the block itself runs fused attention, which never
    materialises them): for pictures and attention distances, not for training."""
    a = blk.attn
    B, L, _ = x.shape
    q, k, _ = a.qkv(blk.norm1(x)).reshape(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    return ((q.float() @ k.float().transpose(-2, -1)) * a.head_dim ** -0.5).softmax(dim=-1)


def build_encoder(cfg, extra_tokens: int = 0) -> ViTEncoder:
    """The student encoder of a point (`model` group; channels from `data`)."""
    m = cfg.model
    return ViTEncoder(m.input_size, m.patch_size, cfg.data.channels, m.embed_dim, m.depth, m.num_heads,
                      m.mlp_ratio, m.drop_path, extra_tokens)


def upgrade_state_dict(model: nn.Module, state: dict) -> dict:
    """Checkpoints written before the encoder took timm's names and stored its position tables: rename
    `*patch_embed.weight/bias` -> `*patch_embed.proj.weight/bias`, and fill every position table the
    checkpoint lacks with the (timm-ordered) table it was trained with. A no-op for current checkpoints."""
    state = dict(state)
    for key in [k for k in state if k.endswith(("patch_embed.weight", "patch_embed.bias"))]:
        head, leaf = key.rsplit(".", 1)
        state[f"{head}.proj.{leaf}"] = state.pop(key)
    for name, buf in model.state_dict().items():
        if name.endswith("pos_embed") and name not in state:
            grid = int(round((buf.shape[1] - 1) ** 0.5))
            state[name] = legacy_sincos_pos_embed(grid, buf.shape[-1])
    return state
