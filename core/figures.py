"""Pictures of what an encoder attends to, logged to each run as PNGs (SemanticMIM Fig. 8/9, App. A).

- `attention_distances`: the mean attention distance per layer and head (ViT's "attention distance",
  SemanticMIM App. A): for every patch query, the attention-weighted distance in pixels to the patches
  it attends to, averaged over queries and images. Low = local heads, high = global heads.
- `attention_distance_png`: those numbers as a figure (one dot per head, layer on the x axis).
- `attention_maps_png`: rows of images, each followed by heat maps of given queries' attention over
  the patch grid (SemanticMIM's [PROXY] maps), and a last row with their mean over the images (Fig. 9),
  drawn as one mosaic (`attention_mosaic`) on one axes.
Matplotlib's object API only (no pyplot state, no display).
"""
from __future__ import annotations

import io

import torch

from core.vit import block_attention


@torch.no_grad()
def encoder_attentions(encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention weights on intact images x: [B, C, H, W] -> [[B, heads, L, L]] per block."""
    h = encoder.add_cls(encoder.embed(x) + encoder.pos_embed[:, 1:])
    out = []
    for blk in encoder.blocks:
        out.append(block_attention(blk, h))
        h = blk(h)
    return out


def attention_distances(attentions: list[torch.Tensor], grid: int, patch_size: int, num_prefix: int) -> torch.Tensor:
    """-> [layers, heads] mean attention distance in pixels, over patch queries and patch keys (the
    weights renormalised over the patches, prefix tokens left out)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float() * patch_size        # [N, 2]
    dist = torch.cdist(pos, pos)                                                      # [N, N] in pixels
    rows = []
    for a in attentions:
        w = a[:, :, num_prefix:, num_prefix:].float().cpu()                           # [B, H, N, N]
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        rows.append((w * dist).sum(-1).mean(dim=(0, 2)))                              # [H]
    return torch.stack(rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def attention_distance_png(dist: torch.Tensor, title: str) -> bytes:
    """dist: [layers, heads] in pixels -> PNG, one dot per head per layer, the layer mean as a line."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    layers, heads = dist.shape
    for h in range(heads):
        ax.scatter(range(1, layers + 1), dist[:, h].tolist(), s=14, alpha=0.7)
    ax.plot(range(1, layers + 1), dist.mean(1).tolist(), color="0.3", linewidth=1, label="mean over heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_xticks(range(1, layers + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def attention_mosaic(imgs: torch.Tensor, maps: torch.Tensor, gap: int = 2):
    """The picture attention_maps_png draws, as one RGB array in [0, 1] (numpy, [rows, cols, 3]).

    imgs: [B, C, H, W] in [0, 1]; maps: [B, Q, grid, grid]. Tiles of H x W with `gap` white pixels between
    them: row b < B holds image b (gray if C = 1), then the Q maps of image b; the last row a blank tile, then
    each query's mean map over the images. A map is upsampled to the image by nearest neighbour (one block per
    patch) and scaled to its own min..max, then coloured with viridis (what one imshow per map would show)."""
    import numpy as np
    from matplotlib import colormaps
    B, Q = maps.shape[:2]
    H, W = imgs.shape[-2:]
    shown = imgs.float().clamp(0, 1).cpu()
    shown = shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown[:, :3]
    rows = torch.cat([maps.float().cpu(), maps.float().cpu().mean(0, keepdim=True)])           # [B+1, Q, g, g]
    up = torch.nn.functional.interpolate(rows, size=(H, W), mode="nearest")                   # [B+1, Q, H, W]
    lo = up.amin(dim=(-2, -1), keepdim=True)
    span = (up.amax(dim=(-2, -1), keepdim=True) - lo)
    scaled = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up))
    coloured = colormaps["viridis"](scaled.numpy())[..., :3]                                   # [B+1, Q, H, W, 3]
    out = np.ones(((B + 1) * (H + gap) - gap, (Q + 1) * (W + gap) - gap, 3))
    for b in range(B + 1):
        y = b * (H + gap)
        if b < B:
            out[y:y + H, :W] = shown[b].permute(1, 2, 0).numpy()
        for q in range(Q):
            x = (q + 1) * (W + gap)
            out[y:y + H, x:x + W] = coloured[b, q]
    return out


def attention_maps_png(imgs: torch.Tensor, maps: torch.Tensor, query_names: list[str], title: str) -> bytes:
    """imgs: [B, C, H, W] in [0, 1]; maps: [B, Q, grid, grid] (each query's weights over the patches) -> PNG of
    attention_mosaic, the queries named above their columns and the rows on the left. One image on one axes:
    a few tenths of a second, where a grid of (B+1) x (Q+1) axes took ~13 s for 8 images and 9 queries."""
    B, Q = maps.shape[:2]
    H, W = imgs.shape[-2:]
    gap = 2
    mosaic = attention_mosaic(imgs, maps, gap)
    fig = _figure(1.1 * (Q + 1) + 0.8, 1.1 * (B + 1) + 0.8)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([(W + gap) * c + W / 2 for c in range(Q + 1)], ["image", *query_names], fontsize=7, rotation=30,
                  ha="left")
    ax.set_yticks([(H + gap) * r + H / 2 for r in range(B + 1)], [*(str(b + 1) for b in range(B)), f"mean of\n{B}"],
                  fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    return _png(fig)
