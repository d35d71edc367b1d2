"""Evaluation of a pre-trained encoder: the protocols of `evaluate.protocols`, on the test split.

One module per protocol, this one holds what they share and the dispatch:
- `knn` (here): cosine similarity, the k nearest training features vote with weight exp(sim / T)
  (k=20, T=0.07: DINO's weighted k-NN);
- `linear` (core/linear_probe.py): BatchNorm without affine + Linear (as MAE) on frozen features of any
  set of layers x poolings, every layer x pooling x lr head trained at once over one feature pass;
- `finetune` (core/finetune.py): end-to-end on a copy of the encoder;
- `seg_linear` (core/seg_probe.py): a 1x1-conv probe on frozen patch tokens, scored by mIoU;
- `external` (core/external_eval.py): a user command whose metrics file lands in the run.

Everything runs on the job's device (features stay there). The random-init floor of each protocol is
computed once per key and reused (core/floors.py). Progress: a tqdm bar per feature pass and per
training loop (MIMSWEEP_PROGRESS=0 turns them off, as for pre-training).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from core import data as data_lib

PROTOCOLS = ("knn", "linear", "finetune", "seg_linear", "external")
FLOOR_PROTOCOLS = ("knn", "linear", "finetune", "seg_linear")  # an external command has no floor


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, mininterval=2.0, dynamic_ncols=True,
                disable=os.environ.get("MIMSWEEP_PROGRESS", "1") == "0")


def say(protocol: str, results: dict, t0: float) -> None:
    """One plain line per finished protocol (SLURM logs have no progress bars)."""
    shown = ", ".join(f"{k}={v:.2f}" for k, v in results.items() if not k.endswith("_wall_s") and "_lr/" not in k)
    print(f"evaluate {protocol}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)


def arch_kwargs(encoder) -> dict:
    """The constructor arguments of a ViTEncoder (core/vit.py) without drop path: its architecture."""
    return dict(img_size=encoder.img_size, patch_size=encoder.patch_size, in_chans=encoder.in_chans,
                embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                mlp_ratio=encoder.mlp_ratio, extra_tokens=encoder.extra_tokens)


def block_name(layer: int, depth: int) -> str:
    """0-based layer index (-1 = last) -> 'l<block>' with blocks counted from 1, as papers say 'layer 7'."""
    return f"l{layer % depth + 1}"


@torch.no_grad()
def tokens_at(encoder, x: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """Tokens [B, L, D] after each listed block (0-based, mod depth) in one forward pass; the last block's
    output goes through the final norm, as `encoder.features` does."""
    want = {int(l) % encoder.depth for l in layers}
    x = encoder.add_cls(encoder.embed(x) + encoder.pos_embed[:, 1:])
    out = {}
    for i, blk in enumerate(encoder.blocks[: max(want) + 1]):
        x = blk(x)
        if i in want:
            out[i] = encoder.norm(x) if i == encoder.depth - 1 else x
    return out


def pooled(tokens: torch.Tensor, pool: str, num_prefix: int) -> torch.Tensor:
    return tokens[:, 0] if pool == "cls" else tokens[:, num_prefix:].mean(dim=1)


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
            toks = tokens_at(encoder, normalise(imgs, cfg, device), layers)
            for l, p in views:
                feats[(l, p)].append(pooled(toks[l], p, encoder.num_prefix).float())
            labels.append(torch.as_tensor(y).to(device))
            bar.update(len(y))
    return {v: torch.cat(f) for v, f in feats.items()}, torch.cat(labels)


def knn_top1(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    train_y, test_y = train_y.to(train_f.device), test_y.to(train_f.device)
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.T                       # [b, N_train]
        top_sim, top_idx = sim.topk(min(k, len(train_f)), dim=1)    # [b, k]
        votes = torch.zeros(len(sim), num_classes, device=sim.device).scatter_add_(
            1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_f)


def linear_top1(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 50, lr: float = 0.1,
                batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> float:
    """One probe (lr as given, SGD + cosine): the linear protocol with a single view and lr."""
    from core.linear_probe import train_grid
    best = train_grid({"f": train_f}, train_y, {"f": test_f}, test_y, num_classes, [lr * 256 / batch_size],
                      epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    return best["f"][0]


def evaluate(encoder, cfg, train_split, test_split, device, protocols=None, workdir=None, run_id=None,
             name: str = "") -> dict:
    """-> {metric: value} of the listed protocols (default: evaluate.protocols) on this encoder; `name`
    prefixes its log lines (e.g. "floor ")."""
    e, n = cfg.evaluate, train_split.num_classes
    protocols = list(e.protocols if protocols is None else protocols)
    depth = encoder.depth
    results = {}
    if "knn" in protocols or "linear" in protocols:
        t0 = time.perf_counter()
        default = (e.layer % depth, e.pool)
        views = {default} if "knn" in protocols else set()
        if "linear" in protocols:
            views |= {(int(l) % depth, str(p)) for l in e.linear.layers for p in e.linear.pools}
        views = sorted(views)
        train_f, train_y = extract(encoder, train_split, cfg, device, views, "features (train)")
        test_f, test_y = extract(encoder, test_split, cfg, device, views, "features (test)")
        extract_s = time.perf_counter() - t0
        if "knn" in protocols:
            t1 = time.perf_counter()
            results["knn_top1"] = knn_top1(train_f[default], train_y, test_f[default], test_y, n, e.knn.k,
                                           e.knn.temperature)
            results["knn_wall_s"] = extract_s + time.perf_counter() - t1
            say(name + "knn", {"knn_top1": results["knn_top1"]}, t1 - extract_s)
        if "linear" in protocols:
            from core import linear_probe
            t1 = time.perf_counter()
            lin = linear_probe.run(train_f, train_y, test_f, test_y, n, cfg, depth)
            results.update(lin, linear_wall_s=extract_s + time.perf_counter() - t1)
            say(name + "linear", lin, t1 - extract_s)
        del train_f, test_f
    if "seg_linear" in protocols:
        from core import seg_probe
        t1 = time.perf_counter()
        got = seg_probe.run(encoder, cfg, train_split, test_split, device)
        results.update(got, seg_linear_wall_s=time.perf_counter() - t1)
        say(name + "seg_linear", got, t1)
    if "finetune" in protocols:
        from core import finetune
        t1 = time.perf_counter()
        got = finetune.run(encoder, cfg, train_split, test_split, device)
        results.update(got, finetune_wall_s=time.perf_counter() - t1)
        say(name + "finetune", got, t1)
    if "external" in protocols:
        from core import external_eval
        t1 = time.perf_counter()
        got = external_eval.run(encoder, cfg, workdir, run_id)
        results.update(got, external_wall_s=time.perf_counter() - t1)
        say(name + "external", got, t1)
    return results


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` of `total`: linear warm-up, then half cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
