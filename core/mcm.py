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
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.vit import ViTEncoder, blocks, init_weights, sincos_pos_embed


class MCM(nn.Module):
    def __init__(self, encoder: ViTEncoder, target_dim: int, mask_ratio: float = 0.75,
                 masking: str = "random", encode_channel_forward: bool = True, recon_range: str = "all",
                 decoder_dim: int | None = None, decoder_depth: int = 2, decoder_heads: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        D = encoder.embed_dim
        decoder_dim = decoder_dim or D
        self.mask_ratio, self.masking = mask_ratio, masking
        self.encode_channel_forward, self.recon_range = encode_channel_forward, recon_range
        self.num_masked = int(round(D * mask_ratio))
        self.encode_channel = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_channel = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(encoder.grid, decoder_dim), persistent=False)
        self.decoder_blocks = blocks(decoder_dim, decoder_depth, decoder_heads or encoder.blocks[0].attn.num_heads,
                                     mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, D)
        self.register_buffer("target_proj", self._frozen_projection(target_dim, D))
        for m in (self.decoder_blocks, self.decoder_embed, self.decoder_norm, self.decoder_pred):
            init_weights(m)
        nn.init.normal_(self.encode_channel, std=0.02)
        nn.init.normal_(self.mask_channel, std=0.02)

    @staticmethod
    def _frozen_projection(t: int, d: int) -> torch.Tensor:
        """[T, D] map of the target into D channels: identity if T == D, else semi-orthogonal."""
        if t == d:
            return torch.eye(d)
        w = torch.empty(t, d)
        nn.init.orthogonal_(w)
        return w

    def channel_masking(self, B: int, N: int, D: int, device) -> torch.Tensor:
        """-> mask: [B, N, D] bool, exactly D_m channels True (masked) in every patch."""
        if self.masking == "random":
            ids = torch.argsort(torch.rand(B, N, D, device=device), dim=-1)[..., : self.num_masked]
        else:  # block-wise: one contiguous cyclic run of D_m channels per patch
            start = torch.randint(0, D, (B, N, 1), device=device)
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
        """f: [B, 1 + N, D] -> z: [B, N, D]; masked channels swapped for the mask channel first."""
        patches = torch.where(mask, self.mask_channel.to(f.dtype), f[:, 1:])
        x = self.decoder_embed(torch.cat([f[:, :1], patches], dim=1)) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def project_target(self, target: torch.Tensor) -> torch.Tensor:
        """target: [B, N, T] -> [B, N, D] through the frozen map (no gradient can reach it)."""
        return target.float() @ self.target_proj

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: [B, N, D], target: [B, N, D], mask: [B, N, D]. MSE over all channels or masked only."""
        err = (z.float() - target) ** 2
        if self.recon_range == "masked":
            return (err * mask).sum() / mask.sum()
        return err.mean()

    def forward(self, imgs: torch.Tensor, target: torch.Tensor):
        f, mask = self.forward_encoder(imgs)
        z = self.forward_decoder(f, mask)
        return self.forward_loss(z, self.project_target(target), mask), {"pred": z, "mask": mask}
