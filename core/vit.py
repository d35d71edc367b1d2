"""The ViT pieces every method shares: patchify, position embeddings, timm blocks, initialisation.

Blocks are timm's `Block` (fused scaled-dot-product attention where PyTorch has it). The encoder's
parameter names are timm's `VisionTransformer` names (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.i`, `norm`), so its state_dict exports to timm as it is (`timm_state_dict`) and an official MAE
checkpoint loads into it by name (core/methods/mae.py). This module adds what timm leaves to the caller: frozen
sin-cos position embeddings in MAE's channel order, and the initialisations of the official codes.

Architecture options (MAE's are the defaults; SemanticMIM's BEiT variant uses the others):
- `pos_embed`: `sincos` (MAE: fixed table, a buffer) | `learnable` (BEiT / mmpretrain: trunc-normal 0.02);
- `qkv_bias`: `all` | `qv` (BEiT: q and v biases, none on k) | `none`;
- `layer_scale`: None | the initial value of BEiT's per-channel residual scales (timm's `init_values`);
- `init`: `xavier` (MAE: xavier-uniform linears, patch projection as one matrix) | `trunc_normal`
  (mmpretrain: every linear and the patch projection trunc-normal 0.02) | `beit` (trunc_normal, then the
  MLPs as mmcv's FFN initialises them: xavier-uniform weights, N(0, 1e-6) biases);
- `init_rescale`: BEiT's 1 / sqrt(2 l) scaling of the l-th block's attention and MLP output projections;
- how evaluation reads features (`pool`): `cls_pool` `token` ([CLS], MAE) | `proxy_mean` (the mean of every
  prefix token, SemanticMIM's "CLS"), and `pool_norm` `final` (the last block's tokens pass the final norm,
  then pooling: MAE) | `layernorm` (no final norm; the pooled vector is layer-normalised: SemanticMIM's
  fresh `ln2`, frozen at identity in a linear probe).
"""
from __future__ import annotations

from functools import partial

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_EMBED = ("sincos", "learnable")
QKV_BIAS = ("all", "qv", "none")
INIT = ("xavier", "trunc_normal", "beit")
CLS_POOL = ("token", "proxy_mean")
POOL_NORM = ("final", "layernorm")


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


class QVBiasLinear(nn.Linear):
    """The q/k/v projection of BEiT's attention: learnable biases on q and v, none on k.

    timm's ViT `Attention` has one bias on all of q, k, v or none; its BEiT attention carries relative
    position machinery and other parameter names. Swapping this in as `attn.qkv` keeps timm's Block and
    its attention forward as they are, and exports to timm as a plain qkv bias whose k third is 0."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))

    def full_bias(self) -> torch.Tensor:
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.full_bias())


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth increasing linearly from 0 at the first block to `drop_path` at the last."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


def blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0,
           qkv_bias: str = "all", layer_scale: float | None = None) -> nn.ModuleList:
    """A stack of timm ViT blocks with a linearly increasing drop-path rate (options: module docstring)."""
    # timm is imported here, not at the top: it costs ~1 s, and a launch or status.py imports this module
    # (through the method registry) without building any model
    from timm.models.vision_transformer import Block
    stack = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias == "all", init_values=layer_scale, drop_path=r,
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for r in drop_path_rates(drop_path, depth)
    )
    if qkv_bias == "qv":
        for blk in stack:
            blk.attn.qkv = QVBiasLinear(dim)
    return stack


def init_weights(module: nn.Module, scheme: str = "xavier") -> None:
    """Linear and LayerNorm initialisation of the official codes (module docstring): `xavier` (MAE),
    `trunc_normal` (mmpretrain, std 0.02), `beit` (trunc_normal, then mmcv's FFN init of the MLPs).
    Biases 0, LayerNorms 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if scheme == "beit":  # mmcv's FFN initialises its own linears after the model's init (mmpretrain's BEiT)
        from timm.layers import Mlp
        for m in module.modules():
            if isinstance(m, Mlp):
                for fc in (m.fc1, m.fc2):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.normal_(fc.bias, std=1e-6)


@torch.no_grad()
def rescale_init(stack) -> None:
    """BEiT's init rescale: the output projections of attention and MLP of block l (from 1) / sqrt(2 l),
    so the residual stream's variance does not grow with depth at init."""
    for layer, blk in enumerate(stack, start=1):
        attn = getattr(blk, "attn", blk)   # timm Block: blk.attn.proj; a cross-attention block: blk.proj
        attn.proj.weight.div_(math.sqrt(2 * layer))
        blk.mlp.fc2.weight.div_(math.sqrt(2 * layer))


class PatchEmbed(nn.Module):
    """Conv patch projection named as timm's (`patch_embed.proj`), so state_dicts map one to one."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)  # [B, N, D]


class ViTEncoder(nn.Module):
    """Plain ViT encoder: patch embedding + [CLS] + pos-emb + blocks + final norm.

    The methods call its pieces step by step (embed, then mask, then run the blocks); `features` / `pool`
    are the frozen-feature path used by evaluation. A fixed sin-cos position table is a persistent buffer:
    it is part of every checkpoint and export, so a reader never depends on how this code happens to build it.
    Architecture and feature options: the module docstring.

    `extra_tokens` learnable tokens follow [CLS], each with a learnable position slot (trunc-normal 0.02):
    SemanticMIM's [PROXY] tokens beyond the first (the reference code makes them extra [CLS] slots);
    they stay in the encoder after pre-training and export as timm's `reg_token`s.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, extra_tokens: int = 0,
                 pos_embed: str = "sincos", qkv_bias: str = "all", layer_scale: float | None = None,
                 init: str = "xavier", init_rescale: bool = False, cls_pool: str = "token",
                 pool_norm: str = "final"):
        super().__init__()
        for name, value, allowed in [("pos_embed", pos_embed, POS_EMBED), ("qkv_bias", qkv_bias, QKV_BIAS),
                                     ("init", init, INIT), ("cls_pool", cls_pool, CLS_POOL),
                                     ("pool_norm", pool_norm, POOL_NORM)]:
            if value not in allowed:
                raise ValueError(f"ViTEncoder: {name}={value!r}; allowed: {', '.join(allowed)}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = embed_dim, depth, num_heads, mlp_ratio
        self.extra_tokens = extra_tokens
        self.num_prefix = 1 + extra_tokens
        self.arch = dict(pos_embed=pos_embed, qkv_bias=qkv_bias, layer_scale=layer_scale, init=init,
                         init_rescale=init_rescale, cls_pool=cls_pool, pool_norm=pool_norm)
        self.cls_pool, self.pool_norm = cls_pool, pool_norm
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if extra_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, extra_tokens, embed_dim))
            self.reg_pos = nn.Parameter(torch.zeros(1, extra_tokens, embed_dim))
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.blocks = blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path, qkv_bias, layer_scale)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self, init)
        w = self.patch_embed.proj.weight.data
        if init == "xavier":  # MAE: the patch projection as one [D, C*p*p] matrix
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        else:
            nn.init.trunc_normal_(w, std=0.02)
            if init == "beit":
                nn.init.zeros_(self.patch_embed.proj.bias)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if pos_embed == "learnable":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if extra_tokens:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
            nn.init.trunc_normal_(self.reg_pos, std=0.02)
        if init_rescale:
            rescale_init(self.blocks)

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

    def pool(self, x: torch.Tensor, pool: str, last: bool) -> torch.Tensor:
        """The evaluation feature [B, D] of a block's raw output x [B, L, D] (`last`: the last block's):
        `pool` cls or mean (of the patch tokens), read as `cls_pool` / `pool_norm` say (module docstring)."""
        if last and self.pool_norm == "final":
            x = self.norm(x)
        if pool == "cls":
            f = x[:, : self.num_prefix].mean(dim=1) if self.cls_pool == "proxy_mean" else x[:, 0]
        else:
            f = x[:, self.num_prefix:].mean(dim=1)
        return F.layer_norm(f, f.shape[-1:], eps=1e-6) if self.pool_norm == "layernorm" else f

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean", layer: int = -1) -> torch.Tensor:
        """Frozen features of intact images: [B, D], from block `layer` (-1 = last), read by `pool`."""
        x = self.add_cls(self.embed(imgs) + self.pos_embed[:, 1:])
        layer = layer % self.depth
        for blk in self.blocks[: layer + 1]:
            x = blk(x)
        return self.pool(x, pool, last=layer == self.depth - 1)

    # ---- timm conventions: optimiser parameter groups and export
    def no_weight_decay(self) -> set[str]:
        """Names (relative to the encoder) without weight decay in pre-training besides 1-D parameters
        (biases, norms, q/v biases, layer scales): none. The sin-cos table is a buffer, and [CLS] is decayed,
        as in the official MAE (timm 0.3.2 add_weight_decay); a method may exclude more."""
        return set()

    def finetune_no_weight_decay(self) -> set[str]:
        """Names without weight decay in fine-tuning: the tokens and position tables, as the official
        fine-tuning codes (MAE's param_groups_lrd with timm's no_weight_decay; mmpretrain's custom keys)."""
        names = {"cls_token", "pos_embed"}
        return names | ({"reg_token", "reg_pos"} if self.extra_tokens else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-grouping convention (layer-wise lr decay): stem, then one group per block."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def timm_kwargs(self, pool: str = "mean") -> dict:
        """timm.create_model kwargs that build this architecture as a `VisionTransformer` whose pooled output
        (`model(x)`) is `self.features(x, pool)`: `mean` = timm's `avg` pool of the patch tokens after the
        final norm (`fc_norm=False` keeps timm's norm before the pool, as here), `cls` = timm's `token`.
        q/v-only biases become a qkv bias whose k part is 0; `proxy_mean` / `layernorm` pooling has no timm
        equivalent (timm pools [CLS] after the final norm)."""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be mean or cls, got {pool!r}")
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    num_classes=0, global_pool="avg" if pool == "mean" else "token", fc_norm=False,
                    reg_tokens=self.extra_tokens,
                    qkv_bias=self.arch["qkv_bias"] != "none", init_values=self.arch["layer_scale"])

    def timm_state_dict(self) -> dict:
        """This encoder as a timm `vit_*` state_dict (names are already timm's; CPU, contiguous). Extra
        tokens become timm's reg_token, their position slots join the table after [CLS]'s."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        for i, blk in enumerate(self.blocks):
            if isinstance(blk.attn.qkv, QVBiasLinear):
                sd.pop(f"blocks.{i}.attn.qkv.q_bias"), sd.pop(f"blocks.{i}.attn.qkv.v_bias")
                sd[f"blocks.{i}.attn.qkv.bias"] = blk.attn.qkv.full_bias().detach().cpu()
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


def build_encoder(cfg, extra_tokens: int = 0, **arch) -> ViTEncoder:
    """The student encoder of a point (`model` group; channels from `data`); `arch`: the method's
    architecture options (ViTEncoder's keyword arguments; MAE's when none)."""
    m = cfg.model
    return ViTEncoder(m.input_size, m.patch_size, cfg.data.channels, m.embed_dim, m.depth, m.num_heads,
                      m.mlp_ratio, m.drop_path, extra_tokens, **arch)


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
