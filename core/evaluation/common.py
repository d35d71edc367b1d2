"""What the evaluation protocols share: features of a frozen encoder, normalisation, schedules, progress."""
from __future__ import annotations

import math
import os
import time

import torch

from core.training import data as data_lib


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, mininterval=2.0, dynamic_ncols=True,
                disable=os.environ.get("MIMSWEEP_PROGRESS", "1") == "0")


def say(protocol: str, results: dict, t0: float) -> None:
    """One plain line per finished protocol (SLURM logs have no progress bars)."""
    shown = ", ".join(f"{k}={v:.2f}" for k, v in results.items() if not k.endswith("_wall_s") and "_lr/" not in k)
    print(f"evaluate {protocol}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)


def arch_kwargs(encoder) -> dict:
    """The constructor arguments of a ViTEncoder (core/vit.py) without drop path: its architecture (and how
    its features are read)."""
    return dict(img_size=encoder.img_size, patch_size=encoder.patch_size, in_chans=encoder.in_chans,
                embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                mlp_ratio=encoder.mlp_ratio, extra_tokens=encoder.extra_tokens, **encoder.arch)


def block_name(layer: int, depth: int) -> str:
    """0-based layer index (-1 = last) -> 'l<block>' with blocks counted from 1, as papers say 'layer 7'."""
    return f"l{layer % depth + 1}"


@torch.no_grad()
def tokens_at(encoder, x: torch.Tensor, layers, raw: bool = False) -> dict[int, torch.Tensor]:
    """Tokens [B, L, D] after each listed block (0-based, mod depth) in one forward pass; the last block's
    output goes through the final norm (as a dense probe reads it) unless `raw` (for `encoder.pool`)."""
    want = {int(l) % encoder.depth for l in layers}
    x = encoder.add_cls(encoder.embed(x) + encoder.pos_embed[:, 1:])
    out = {}
    for i, blk in enumerate(encoder.blocks[: max(want) + 1]):
        x = blk(x)
        if i in want:
            out[i] = encoder.norm(x) if i == encoder.depth - 1 and not raw else x
    return out


def normalise(imgs: torch.Tensor, cfg, device) -> torch.Tensor:
    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    return (imgs.to(device, non_blocking=True) - mean) / std


@torch.no_grad()
def extract(encoder, split, cfg, device, views, desc: str = "features"):
    """One pass over a split -> ({(layer, pool): features [N, D] float32 on `device`}, labels [N] on device).
    views: (0-based layer mod depth, 'mean' | 'cls') pairs."""
    encoder.eval()
    layers = sorted({l for l, _ in views})
    feats, labels = {v: [] for v in views}, []
    loader = data_lib.eval_loader(split, cfg.data, cfg.model.input_size, cfg.evaluate.batch_size)
    with progress(len(loader.dataset), desc) as bar:
        for imgs, y in loader:
            toks = tokens_at(encoder, normalise(imgs, cfg, device), layers, raw=True)
            for l, p in views:  # the encoder says how its features are read (core/vit.py `pool`)
                feats[(l, p)].append(encoder.pool(toks[l], p, last=l == encoder.depth - 1).float())
            labels.append(torch.as_tensor(y).to(device))
            bar.update(len(y))
    return {v: torch.cat(f) for v, f in feats.items()}, torch.cat(labels)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` of `total`: linear warm-up, then half cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
