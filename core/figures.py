"""Pictures of what an encoder attends to, logged to each run as PNGs (SemanticMIM Fig. 8/9, App. A).

- `attention_distances`: the mean attention distance per layer and head (ViT's "attention distance",
  SemanticMIM App. A): for every patch query, the attention-weighted distance in pixels to the patches
  it attends to, averaged over queries and images. Low = local heads, high = global heads.
- `attention_distance_png`: those numbers as a figure (one dot per head, layer on the x axis).
- `attention_maps_png`: rows of images, each followed by heat maps of given queries' attention over
  the patch grid (SemanticMIM's [PROXY] maps), and a last row with their mean over the images (Fig. 9).
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


def attention_maps_png(imgs: torch.Tensor, maps: torch.Tensor, query_names: list[str], title: str) -> bytes:
    """imgs: [B, C, H, W] in [0, 1]; maps: [B, Q, grid, grid] (each query's weights over the patches)."""
    B, Q = maps.shape[:2]
    fig = _figure(1.3 * (Q + 1), 1.35 * (B + 1) + 0.4)
    grid = fig.subplots(B + 1, Q + 1, squeeze=False)
    shown = imgs.float().clamp(0, 1).cpu()
    for b in range(B + 1):
        for q in range(Q + 1):
            ax = grid[b][q]
            ax.set_xticks([])
            ax.set_yticks([])
            if q == 0:
                if b < B:
                    ax.imshow(shown[b].permute(1, 2, 0).squeeze(-1), cmap="gray" if shown.shape[1] == 1 else None)
                else:
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"mean of\n{B} images", ha="center", va="center", fontsize=8)
                continue
            m = maps[b, q - 1] if b < B else maps[:, q - 1].mean(0)
            ax.imshow(m.float().cpu(), cmap="viridis")
            if b == 0:
                ax.set_title(query_names[q - 1], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
