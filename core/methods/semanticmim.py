"""SemanticMIM (Yuan et al.): compress the visible image into a few [PROXY] tokens, reconstruct from them.

Tokens: [IMG] (the visible patches, L0), [PROXY] (L1 = `method.num_proxies` learnable tokens; the first
is [CLS], the others extra [CLS]-like slots with learnable positions, as the reference code has them),
[MASK] (L2 queries: a learnable token + the position of each masked patch). Every layer i is
    compression:    [IMG]+[PROXY] -> self-attention + MLP (encoder block i)          -> h^{i+1}
    reconstruction: [MASK] queries attend over [PROXY] (h^{i+1}) + [MASK], then MLP  (own weights)
so [IMG] never sees [MASK] and everything [MASK] learns about the image passes through the proxies.
The reconstruction blocks are dropped after pre-training (only `encoder` is evaluated and exported);
the loss covers the [MASK] tokens only, the proxies are never supervised directly.

`num_proxies: 0` is the vanilla baseline the paper wraps (BEiT, MaskFeat): one [CLS], and the encoder
runs over every token with [MASK] tokens in place of the masked patches, a linear head on top.

As the official code (mmpretrain-based) builds it: learnable position embeddings, trunc-normal init, the
same block options in the compression and reconstruction stacks (`method.qkv_bias`, `layer_scale`,
`init`, `init_rescale`: BEiT's variant uses q/v biases, layer scale 0.1, mmcv's FFN init and the
1/sqrt(2l) rescale; core/vit.py), weight decay excluded from `method.no_weight_decay` (the MaskFeat
variant: [MASK]; the BEiT variant: the proxies and position table), and the evaluation features of the
official `ln2`: "CLS" = LayerNorm(mean of the proxies), "Patch" = LayerNorm(mean of the patch tokens),
no final norm (core/vit.py `cls_pool` / `pool_norm`).

Targets (`method.target`): `hog` (MaskFeat's HOG of `hog_cell_size` px cells, a Gaussian window of
`hog_window` px, core/targets/hog.py; L2), `tokens` (BEiT: visual tokens of `method.tokenizer`,
core/targets/tokenizers.py; cross-entropy), `teacher` (frozen-teacher patch features; L2), `pixel` /
`norm_pixel` (L2). Masking is random per patch, ceil(N r) masked, as the official generator (BEiT/MaskFeat's
block-wise masking is not used there).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import check, check_in, check_list, check_number
from core.targets.hog import hog_patch_targets
from core.methods.mae import check_patch_mask_ratio, check_teacher_target, patch_targets, random_patch_masking
from core.methods import register
from core.methods.base import Method
from core.targets.normalize import pixel_dim
from core.vit import INIT, POS_EMBED, QKV_BIAS, ViTEncoder, build_encoder, drop_path_rates, init_weights, rescale_init

# the parameters `method.no_weight_decay` may name (besides 1-D parameters, which are never decayed)
DECAY_OPTIONAL = ("mask_token", "encoder.cls_token", "encoder.reg_token", "encoder.reg_pos", "encoder.pos_embed")
# SemanticMIM's architecture as the official code builds it (method keys), for configs that predate them
ARCH_DEFAULTS = dict(pos_embed="learnable", qkv_bias="all", layer_scale=None, init="trunc_normal", init_rescale=False)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: queries [B, Q, D] attend over a context [B, C, D], then an MLP.

    Hand-written on F.scaled_dot_product_attention because timm has no cross-attention block; the
    fused kernel never materialises the attention matrix (memory-efficient on GPU). One LayerNorm
    (`norm1`) serves queries and context, as the official block's. Options as the encoder's blocks:
    `qkv_bias` all | qv | none, `layer_scale` (initial value or None), drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 qkv_bias: str = "all", layer_scale: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim, bias=qkv_bias != "none")
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias == "all")
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias == "qv" else None   # k gets no bias (BEiT)
        self.proj = nn.Linear(dim, dim)
        from timm.layers import DropPath, LayerScale, Mlp  # here: importing timm costs ~1 s, a launch imports this module
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, d]
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries: [B, Q, D]; context: [B, C, D] (the queries are part of it when they should see each other)."""
        qn = self.norm1(queries)
        kn = self.norm1(context)
        k, v = self.kv(kn).chunk(2, dim=-1)
        if self.v_bias is not None:
            v = v + self.v_bias
        out = F.scaled_dot_product_attention(self.split(self.q(qn)), self.split(k), self.split(v))
        out = out.transpose(1, 2).reshape(queries.shape)
        x = queries + self.drop_path(self.ls1(self.proj(out)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


@register
class SemanticMIM(Method):
    name = "semanticmim"
    targets = ("hog", "tokens", "teacher", "pixel", "norm_pixel")

    def __init__(self, encoder: ViTEncoder, target_dim: int, num_proxies: int = 8, mask_ratio: float = 0.6,
                 target: str = "hog", target_norm: str = "layernorm", hog_cell_size: int = 8,
                 hog_window: int | None = None, tokenizer=None, drop_path: float = 0.0, teacher_request=None,
                 no_weight_decay=("mask_token",)):
        super().__init__()
        self.encoder = encoder
        D, arch = encoder.embed_dim, encoder.arch
        self.num_proxies, self.mask_ratio = num_proxies, mask_ratio
        self.target, self.target_norm, self.hog_cell_size, self.hog_window = target, target_norm, hog_cell_size, hog_window
        self.tokenizer, self.request = tokenizer, teacher_request
        self.decay_excluded = set(no_weight_decay)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        if num_proxies:  # the reconstruction stack: as deep as the encoder, the same block options
            self.recon_blocks = nn.ModuleList(
                CrossBlock(D, encoder.num_heads, encoder.mlp_ratio, r, arch["qkv_bias"], arch["layer_scale"])
                for r in drop_path_rates(drop_path, encoder.depth))
            self.recon_norm = nn.LayerNorm(D, eps=1e-6)
            init_weights(self.recon_blocks, arch["init"])
            init_weights(self.recon_norm, arch["init"])
            if arch["init_rescale"]:
                rescale_init(self.recon_blocks)
        self.head = nn.Linear(D, target_dim)
        init_weights(self.head, arch["init"])
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ---- from the config
    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_patch_mask_ratio(cfg)
        check_number(cfg, "method.num_proxies", 0, integer=True)
        check_teacher_target(cfg)
        m = cfg.method
        for key, allowed in (("pos_embed", POS_EMBED), ("qkv_bias", QKV_BIAS), ("init", INIT)):
            if key in m:
                check_in(cfg, f"method.{key}", allowed)
        if "layer_scale" in m:
            check_number(cfg, "method.layer_scale", 0, lo_open=True, optional=True)
        if "init_rescale" in m:
            check(isinstance(m.init_rescale, bool), "method.init_rescale", m.init_rescale, "must be true or false")
        if "no_weight_decay" in m:
            check_list(cfg, "method.no_weight_decay", lambda n: n in DECAY_OPTIONAL,
                       "must be a list of " + ", ".join(DECAY_OPTIONAL) + " (1-D parameters are never decayed)",
                       nonempty=False)
        if m.target == "hog":
            cell = cls.hog_cell(cfg)
            check(cfg.model.patch_size % cell == 0, "method.hog_cell_size", cell,
                  f"must divide model.patch_size={cfg.model.patch_size} (each patch holds whole HOG cells)")
            check_number(cfg, "method.hog_window", 0, integer=True, optional=True)
            w = m.get("hog_window")
            check(not w or cfg.model.input_size % w == 0, "method.hog_window", w,
                  f"must divide model.input_size={cfg.model.input_size} (the window is tiled over the image), or be "
                  "0 (no window) or null (one window per patch)")
        if m.target == "tokens":
            check_in(cfg, "method.tokenizer.kind", ("kmeans", "dalle"))
            if m.tokenizer.kind == "dalle":
                from core.config import resolve_path
                path = m.tokenizer.get("path")
                check(bool(path) and resolve_path(path).is_file(), "method.tokenizer.path", path,
                      "must be a local copy of the DALL-E dVAE encoder (encoder.pkl)",
                      "Download https://cdn.openai.com/dall-e/encoder.pkl onto the cluster and set the key.")
                import importlib.util
                check(importlib.util.find_spec("dall_e") is not None, "method.tokenizer.kind", "dalle",
                      "needs the `dall_e` package to unpickle the encoder", "pip install 'mimsweep[dalle]'.")

    @staticmethod
    def hog_cell(cfg) -> int:
        """`method.hog_cell_size`, or MaskFeat's 8 px (the patch size when patches are smaller)."""
        return cfg.method.get("hog_cell_size") or min(8, cfg.model.patch_size)

    @staticmethod
    def arch(cfg) -> dict:
        """The encoder's architecture options from `method.*` (core/vit.py), and SemanticMIM's features."""
        m = cfg.method
        return {**{k: m.get(k, v) for k, v in ARCH_DEFAULTS.items()}, "cls_pool": "proxy_mean",
                "pool_norm": "layernorm"}

    @classmethod
    def build(cls, cfg, teacher=None) -> "SemanticMIM":
        from core.config import resolve_path
        m, p, C = cfg.method, cfg.model.patch_size, cfg.data.channels
        tokenizer = None
        if m.target == "tokens":
            from core.targets.tokenizers import build_tokenizer
            tok = dict(m.tokenizer)
            if tok.get("path"):
                tok["path"] = str(resolve_path(tok["path"]))
            tokenizer = build_tokenizer(tok)
        cell = cls.hog_cell(cfg)
        dims = {"hog": C * (p // cell) ** 2 * 9, "tokens": tokenizer.vocab_size if tokenizer else 0,
                "teacher": teacher.width if teacher is not None else 0, "pixel": pixel_dim(p, C),
                "norm_pixel": pixel_dim(p, C)}
        encoder = build_encoder(cfg, extra_tokens=max(m.num_proxies - 1, 0), **cls.arch(cfg))
        return cls(encoder, dims[m.target], num_proxies=m.num_proxies, mask_ratio=m.mask_ratio, target=m.target,
                   target_norm=m.get("target_norm", "layernorm"), hog_cell_size=cell, hog_window=m.get("hog_window"),
                   tokenizer=tokenizer, drop_path=cfg.model.drop_path, teacher_request=cls.teacher_request(cfg),
                   no_weight_decay=tuple(m.get("no_weight_decay", ("mask_token",))))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | self.decay_excluded

    def unused_parameters(self) -> set[str]:
        # With proxies, the compression stream's output only feeds the reconstruction through the proxies
        # of each layer: the encoder's final norm is never used in pre-training (nor by SemanticMIM's features).
        return {"encoder.norm.weight", "encoder.norm.bias"} if self.num_proxies else set()

    # ---- per step
    @torch.no_grad()
    def make_targets(self, imgs, x, teacher=None) -> torch.Tensor:
        """-> [B, N, T] float targets, or [B, N] token ids."""
        grid, p = self.encoder.grid, self.encoder.patch_size
        if self.target == "hog":
            return hog_patch_targets(imgs.float(), p, self.hog_cell_size, window=self.hog_window)
        if self.target == "tokens":
            return self.tokenizer(imgs, grid)
        return patch_targets(self, imgs, x, teacher)

    def forward_proxy(self, x: torch.Tensor):
        """x: [B, C, H, W] -> predictions for the masked patches [B, L2, T] and their ids [B, L2]."""
        enc = self.encoder
        tokens = enc.embed(x) + enc.pos_embed[:, 1:]                                  # [B, N, D]
        vis, mask, ids_restore = random_patch_masking(tokens, self.mask_ratio, self.rng(x.device))
        ids_masked = torch.argsort(ids_restore, dim=1)[:, vis.shape[1]:]              # [B, L2]
        pos = enc.pos_embed[:, 1:].expand(x.shape[0], -1, -1)
        m = self.mask_token.to(tokens.dtype) + torch.gather(pos, 1, ids_masked.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        h = enc.add_cls(vis)                                                           # [B, L1 + L0, D]
        P = enc.num_prefix
        for blk, rec in zip(enc.blocks, self.recon_blocks):
            h = blk(h)                                                                 # compression
            m = rec(m, torch.cat([h[:, :P], m], dim=1))                                # reconstruction
        return self.head(self.recon_norm(m)), ids_masked

    def forward_vanilla(self, x: torch.Tensor):
        """The baseline: [MASK] tokens in place of masked patches, the encoder over all of them."""
        enc = self.encoder
        tokens = enc.embed(x)                                                          # [B, N, D]
        _, mask, ids_restore = random_patch_masking(tokens, self.mask_ratio, self.rng(x.device))
        tokens = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        h = enc.run_blocks(enc.add_cls(tokens + enc.pos_embed[:, 1:]))
        keep = int(mask.shape[1] * (1 - self.mask_ratio))
        ids_masked = torch.argsort(ids_restore, dim=1)[:, keep:]                       # [B, L2]
        pred = self.head(h[:, enc.num_prefix:])                                        # [B, N, T]
        return torch.gather(pred, 1, ids_masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1])), ids_masked

    def forward_loss(self, pred: torch.Tensor, targets: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """pred: [B, L2, T] for the masked patches; targets of every patch; ids_masked: [B, L2]."""
        if self.target == "tokens":
            t = torch.gather(targets, 1, ids_masked)                                  # [B, L2]
            return F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), t.reshape(-1))
        t = torch.gather(targets, 1, ids_masked.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
        return F.mse_loss(pred.float(), t.float())

    def forward(self, x: torch.Tensor, targets: torch.Tensor):
        pred, ids_masked = self.forward_proxy(x) if self.num_proxies else self.forward_vanilla(x)
        return self.forward_loss(pred, targets, ids_masked), {"pred": pred, "ids_masked": ids_masked}

    @classmethod
    def cost_model(cls, cfg) -> tuple[int, int]:
        """(pre-training, inference) multiply-adds per image of all blocks by the paper's model (App. C).
        The vanilla baseline's sequence is [CLS] + every patch; ours has L0 visible patches, L1 proxies
        ([CLS] among them), L2 masked queries; at inference there is no reconstruction: a plain block over
        every patch and the L1 proxies (the paper's +3.7 % at L1 = 8)."""
        m, D, depth = cfg.method, cfg.model.embed_dim, cfg.model.depth
        N = (cfg.model.input_size // cfg.model.patch_size) ** 2
        if not m.num_proxies:
            macs = depth * block_cost(1 + N, 0, 0, D)
            return macs, macs
        keep = int(N * (1 - m.mask_ratio))
        return (depth * block_cost(keep, m.num_proxies, N - keep, D),
                depth * block_cost(N + m.num_proxies, 0, 0, D))

    # ---- pictures
    @torch.no_grad()
    def artifacts(self, imgs, x, teacher=None) -> dict[str, bytes]:
        """Attention distance (base class) and, with proxies, each [PROXY]'s attention over the patches of
        the last layer on intact images (Fig. 8), with the mean over the images (Fig. 9)."""
        from core import figures
        files = super().artifacts(imgs, x, teacher)
        if self.num_proxies:
            enc = self.encoder
            last = figures.encoder_attentions(enc, x)[-1]                              # [B, H, L, L]
            P = enc.num_prefix
            w = last[:, :, :P, P:].mean(1)                                             # [B, P, N]
            w = w / w.sum(-1, keepdim=True)
            maps = w.reshape(w.shape[0], P, enc.grid, enc.grid)
            names = ["[CLS]"] + [f"[PROXY] {i}" for i in range(1, P)]
            files["proxy_attention.png"] = figures.attention_maps_png(
                imgs, maps, names, f"last-layer attention of the {P} [PROXY] tokens over the image")
        return files


def block_cost(L0: int, L1: int, L2: int, D: int) -> int:
    """SemanticMIM App. C: multiply-adds of one block for one image, as the paper counts them.
    L1 = 0 is a vanilla block over L = L0 + L2 tokens:        12 L D^2 + 2 L^2 D;
    otherwise  12 (L0+L1) D^2 + 2 (L0+L1)^2 D + 11 L2 D^2 + L1 D^2 + 2 L1 L2 D + 2 L2^2 D."""
    if L1 == 0:
        L = L0 + L2
        return 12 * L * D ** 2 + 2 * L ** 2 * D
    return (12 * (L0 + L1) * D ** 2 + 2 * (L0 + L1) ** 2 * D + 11 * L2 * D ** 2 + L1 * D ** 2
            + 2 * L1 * L2 * D + 2 * L2 ** 2 * D)
