"""MCM, Masked Channel Modeling (Chen et al., Entropy 2025): mask channels, not patches.

Every patch embedding keeps the same number D_v of visible channels; its D_m masked channels are
filled with a shared learnable *encode channel* e (one value per channel index, shared by all patches)
and the full sequence runs through the encoder. Before the decoder the encoder's output at the masked
channels is overwritten by an independent learnable *mask channel* m, so the decoder cannot read back
the encode values. The decoder predicts z: [B, N, D], regressed onto the target mapped to D channels.

Choices the paper leaves open, made here:
- "w/o forward" (Tab. 6) = the masked channels are zero-filled and the encode channel never enters the
  forward pass (so it never receives a gradient either); "w/ forward" = the learnable encode channel is
  filled in and trained, the paper's default.
- Block-wise masking (Tab. 5) = each patch hides one contiguous (cyclic) run of D_m channels starting
  at a random offset, drawn per patch; random masking draws D_m channel indices per patch.
- Target-side projection: the paper maps the teacher's features g: [N, D_c] to D with "a linear layer".
  Trained together with the model, that layer can shrink the targets towards zero and make the loss
  vanish (collapse). Here it is a *frozen* semi-orthogonal map (a buffer drawn once from the seed,
  never optimised), an identity when the target already has D channels (pixels of a 16x16x3 patch for
  ViT-B/16). Channel indices of the target then still mean something, which the "masked channels only"
  reconstruction range (Tab. 7) needs. tests/test_methods.py proves the targets cannot shrink.
- A teacher wider than the encoder (ViT-S with a CLIP-B teacher: 768 > 384): a map into D channels
  would drop half of the target. Here the decoder then predicts P = k*D channels, k = ceil(T / D), and
  the frozen map is [T, P] (identity when T = P, semi-orthogonal -- norm-preserving -- otherwise), so no
  target information is lost. Encoder channel i owns prediction channels i, i + D, ..., i + (k-1)D, which
  is what "masked channels only" (Tab. 7) covers then; with T <= D (k = 1) all this is the paper's map.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.config import check, check_in, check_number
from core.methods.mae import check_decoder, check_teacher_target, patch_target_width, patch_targets
from core.methods import register
from core.methods.base import Method
from core.vit import ViTEncoder, blocks, build_encoder, init_weights, sincos_pos_embed


@register
class MCM(Method):
    name = "mcm"
    targets = ("pixel", "norm_pixel", "teacher")

    def __init__(self, encoder: ViTEncoder, target_dim: int, mask_ratio: float = 0.75,
                 masking: str = "random", encode_channel_forward: bool = True, recon_range: str = "all",
                 decoder_dim: int | None = None, decoder_depth: int = 2, decoder_heads: int | None = None,
                 mlp_ratio: float = 4.0, target: str = "teacher", target_norm: str = "layernorm",
                 teacher_request=None):
        super().__init__()
        self.encoder = encoder
        D = encoder.embed_dim
        self.widen = -(-target_dim // D)  # k: prediction width P = k * D >= T (see the module docstring)
        P = self.widen * D
        decoder_dim = decoder_dim or D
        self.mask_ratio, self.masking = mask_ratio, masking
        self.encode_channel_forward, self.recon_range = encode_channel_forward, recon_range
        self.target, self.target_norm, self.request = target, target_norm, teacher_request
        self.num_masked = int(round(D * mask_ratio))
        self.encode_channel = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_channel = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(encoder.grid, decoder_dim))
        self.decoder_blocks = blocks(decoder_dim, decoder_depth, decoder_heads or encoder.num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, P)
        self.register_buffer("target_proj", self._frozen_projection(target_dim, P))
        for m in (self.decoder_blocks, self.decoder_embed, self.decoder_norm, self.decoder_pred):
            init_weights(m)
        nn.init.normal_(self.encode_channel, std=0.02)
        nn.init.normal_(self.mask_channel, std=0.02)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_number(cfg, "method.mask_ratio", 0, 1, lo_open=True, hi_open=True)
        check_in(cfg, "method.masking", ("random", "block"))
        check_in(cfg, "method.recon_range", ("all", "masked"))
        check_in(cfg, "method.encode_channel_forward", (True, False))
        masked = round(cfg.model.embed_dim * cfg.method.mask_ratio)
        check(0 < masked < cfg.model.embed_dim, "method.mask_ratio", cfg.method.mask_ratio,
              f"must leave at least one masked and one visible channel of model.embed_dim={cfg.model.embed_dim}")
        check_decoder(cfg)
        check_teacher_target(cfg)

    @classmethod
    def build(cls, cfg, teacher=None) -> "MCM":
        m = cfg.method
        return cls(build_encoder(cfg), patch_target_width(cfg, teacher), mask_ratio=m.mask_ratio, masking=m.masking,
                   encode_channel_forward=m.encode_channel_forward, recon_range=m.recon_range,
                   decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                   mlp_ratio=cfg.model.mlp_ratio, target=m.target, target_norm=m.get("target_norm", "layernorm"),
                   teacher_request=cls.teacher_request(cfg))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"encode_channel", "mask_channel"}

    def unused_parameters(self) -> set[str]:
        return set() if self.encode_channel_forward else {"encode_channel"}

    def make_targets(self, imgs, x, teacher=None) -> torch.Tensor:
        """-> [B, N, T] before the frozen map (MAE's targets)."""
        return patch_targets(self, imgs, x, teacher)

    @staticmethod
    def _frozen_projection(t: int, p: int) -> torch.Tensor:
        """[T, P] map of the target into P >= T channels: identity if T == P, else semi-orthogonal
        (isometric: norms and distances of targets are kept)."""
        if t == p:
            return torch.eye(p)
        w = torch.empty(t, p)
        nn.init.orthogonal_(w)
        return w

    def channel_masking(self, B: int, N: int, D: int, device) -> torch.Tensor:
        """-> mask: [B, N, D] bool, exactly D_m channels True (masked) in every patch."""
        g = self.rng(device)
        if self.masking == "random":
            ids = torch.argsort(torch.rand(B, N, D, device=device, generator=g), dim=-1)[..., : self.num_masked]
        else:  # block-wise: one contiguous cyclic run of D_m channels per patch
            start = torch.randint(0, D, (B, N, 1), device=device, generator=g)
            ids = (start + torch.arange(self.num_masked, device=device)) % D
        return torch.zeros(B, N, D, dtype=torch.bool, device=device).scatter_(-1, ids, True)

    def forward_encoder(self, imgs: torch.Tensor):
        """imgs: [B, C, H, W] -> f: [B, 1 + N, D] (normed), mask: [B, N, D]."""
        x = self.encoder.embed(imgs)  # [B, N, D]
        mask = self.channel_masking(*x.shape, x.device)
        fill = self.encode_channel.to(x.dtype) if self.encode_channel_forward else torch.zeros_like(x)
        x = torch.where(mask, fill, x) + self.encoder.pos_embed[:, 1:]
        return self.encoder.run_blocks(self.encoder.add_cls(x)), mask

    def forward_decoder(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """f: [B, 1 + N, D] -> z: [B, N, P]; masked channels swapped for the mask channel first."""
        patches = torch.where(mask, self.mask_channel.to(f.dtype), f[:, 1:])
        x = self.decoder_embed(torch.cat([f[:, :1], patches], dim=1)) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def project_target(self, target: torch.Tensor) -> torch.Tensor:
        """target: [B, N, T] -> [B, N, P] through the frozen map (no gradient can reach it)."""
        return target.float() @ self.target_proj

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z, target: [B, N, P], mask: [B, N, D]. MSE over all channels, or the masked ones (with P = k*D,
        encoder channel i owns channels i, i + D, ...)."""
        err = (z.float() - target) ** 2
        if self.recon_range == "masked":
            mask = mask.repeat(1, 1, self.widen)
            return (err * mask).sum() / mask.sum()
        return err.mean()

    def forward(self, x: torch.Tensor, targets: torch.Tensor):
        f, mask = self.forward_encoder(x)
        z = self.forward_decoder(f, mask)
        return self.forward_loss(z, self.project_target(targets), mask), {"pred": z, "mask": mask}
