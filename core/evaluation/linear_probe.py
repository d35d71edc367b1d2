"""The `linear` protocol: many linear probes trained at once on frozen features (DINOv2's way).

Features of every requested (layer, pooling) view come from ONE pass over the data (core/evaluation/evaluate.py
`extract`); one module holds a head per view x learning rate, each BatchNorm without affine (eps 1e-6) +
Linear (trunc-normal 0.01 init, zero bias), as MAE's probe. One optimiser, one parameter group per
head (its own lr = base lr x batch / 256), one shuffled batch order for all of them: the heads never
interact, so this equals training each alone, at the cost of one. The best lr per view is reported
(`linear_top1/l<block>/<pool>`, and the lr it took in `linear_lr/...`); `linear_top1` is the view of
`evaluate.layer` / `evaluate.pool`, the name reports already use. `evaluate.linear.norm: none` drops the
BatchNorm (SemanticMIM's probe, whose features are already layer-normalised).

Optimiser: SGD (momentum 0.9), LARS (MAE's linear probe: trust ratio and weight decay on matrices
only, trust coefficient 0.001) or AdamW (mmpretrain's, betas 0.9 / 0.999, decay on weight and bias),
linear warm-up then cosine to 0, per step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.evaluation.common import block_name, progress, warmup_cosine


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of every >1-D parameter is scaled by
    trust * ||w|| / ||g + wd * w|| (You et al. 2017, as MAE's probe uses it); 1-D ones get plain SGD."""

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    scale = torch.where((w_norm > 0) & (d_norm > 0), g["trust_coefficient"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(scale)
                buf = self.state[p].get("mu")
                if buf is None:
                    buf = self.state[p]["mu"] = torch.clone(d)
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


class HeadGrid(nn.Module):
    """One BN(affine=False) + Linear head per (view, lr) (`norm`: batchnorm | none); forward(feats) ->
    logits [heads, B, C]."""

    def __init__(self, dims: dict, lrs, num_classes: int, norm: str = "batchnorm"):
        super().__init__()
        self.keys = [(v, lr) for v in dims for lr in lrs]
        self.heads = nn.ModuleList()
        for v, _ in self.keys:
            bn = nn.BatchNorm1d(dims[v], affine=False, eps=1e-6) if norm == "batchnorm" else nn.Identity()
            head = nn.Sequential(bn, nn.Linear(dims[v], num_classes))
            nn.init.trunc_normal_(head[1].weight, std=0.01)
            nn.init.zeros_(head[1].bias)
            self.heads.append(head)

    def forward(self, feats: dict) -> torch.Tensor:
        return torch.stack([h(feats[v]) for (v, _), h in zip(self.keys, self.heads)])


def train_grid(train_f: dict, train_y, test_f: dict, test_y, num_classes: int, lrs, epochs: int = 50,
               batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0, optimizer: str = "sgd",
               warmup_epochs: float = 0, norm: str = "batchnorm") -> dict:
    """-> {view: (best top-1 %, its base lr)} over `lrs` (base lrs: lr = base * batch_size / 256)."""
    device = next(iter(train_f.values())).device
    n = len(train_y)
    batch_size = min(batch_size, n)
    with torch.random.fork_rng(devices=[]):  # the heads' init depends on the seed only, not on what ran before
        torch.manual_seed(seed)
        grid = HeadGrid({v: f.shape[1] for v, f in train_f.items()}, list(lrs), num_classes, norm).to(device)
    groups = [dict(params=list(h.parameters()), peak=lr * batch_size / 256) for (_, lr), h in zip(grid.keys, grid.heads)]
    if optimizer == "lars":
        opt = LARS(groups, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=weight_decay)
    spe = max(n // batch_size, 1)  # whole batches only (BatchNorm needs two samples)
    total, warmup = epochs * spe, int(round(warmup_epochs * spe))
    g = torch.Generator().manual_seed(seed)
    grid.train()
    step = 0
    with progress(total, "linear probes") as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).to(device)
            for b in range(spe):
                ids = order[b * batch_size:(b + 1) * batch_size]
                for group in opt.param_groups:
                    group["lr"] = group["peak"] * warmup_cosine(step, total, warmup)
                logits = grid({v: f[ids] for v, f in train_f.items()})          # [H, B, C]
                loss = F.cross_entropy(logits.flatten(0, 1), train_y[ids].repeat(len(grid.heads)),
                                       reduction="sum") / len(ids)               # each head its own mean loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
    grid.eval()
    with torch.no_grad():
        acc = (grid(test_f).argmax(-1) == test_y.to(device)).float().mean(1).mul(100).tolist()
    best = {}
    for (v, lr), a in zip(grid.keys, acc):
        if v not in best or a > best[v][0]:
            best[v] = (a, lr)
    return best


def run(train_f: dict, train_y, test_f: dict, test_y, num_classes: int, cfg, depth: int) -> dict:
    e = cfg.evaluate
    views = sorted({(int(l) % depth, str(p)) for l in e.linear.layers for p in e.linear.pools})
    best = train_grid({v: train_f[v] for v in views}, train_y, {v: test_f[v] for v in views}, test_y,
                      num_classes, list(e.linear.lrs), e.linear.epochs, e.linear.batch_size,
                      e.linear.weight_decay, cfg.seed, e.linear.optimizer, e.linear.warmup_epochs,
                      e.linear.get("norm", "batchnorm"))
    out = {}
    for (layer, pool), (acc, lr) in best.items():
        name = f"{block_name(layer, depth)}/{pool}"
        out[f"linear_top1/{name}"], out[f"linear_lr/{name}"] = acc, lr
    default = (e.layer % depth, e.pool)
    if default in best:
        out["linear_top1"] = best[default][0]
    return out


def linear_top1(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 50, lr: float = 0.1,
                batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> float:
    """One probe (lr as given, SGD + cosine): the linear protocol with a single view and lr."""
    best = train_grid({"f": train_f}, train_y, {"f": test_f}, test_y, num_classes, [lr * 256 / batch_size],
                      epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    return best["f"][0]
