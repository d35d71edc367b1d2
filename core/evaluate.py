"""Evaluation on frozen features: weighted k-NN and a linear probe, on the dataset's test split.

k-NN: cosine similarity, k nearest training features vote with weight exp(sim / T) (k=20, T=0.07, the
cheap standard of SSL code). Linear probe: BatchNorm without affine + Linear (as MAE), trained with SGD
+ cosine on features extracted once without augmentation -- cheap enough to run in every job.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import data as data_lib


@torch.no_grad()
def extract(encoder, split, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> features [N, D] (float32, on CPU), labels [N]."""
    encoder.eval()
    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    feats, labels = [], []
    for imgs, y in data_lib.eval_loader(split, cfg.data, cfg.model.input_size, cfg.evaluate.batch_size):
        x = (imgs.to(device) - mean) / std
        feats.append(encoder.features(x, cfg.evaluate.pool, cfg.evaluate.layer).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.T                       # [b, N_train]
        top_sim, top_idx = sim.topk(min(k, len(train_f)), dim=1)    # [b, k]
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_f)


def linear_top1(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 50, lr: float = 0.1,
                batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the probe's init depends on the seed only, not on what ran before
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False), nn.Linear(train_f.shape[1], num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_f) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=g)
        for i in range(0, len(order), batch_size):
            ids = order[i:i + batch_size]
            if len(ids) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(train_f[ids]), train_y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def evaluate(encoder, cfg, train_split, test_split, device) -> dict:
    """-> {'knn_top1': %, 'linear_top1': %} of the encoder's frozen features."""
    train_f, train_y = extract(encoder, train_split, cfg, device)
    test_f, test_y = extract(encoder, test_split, cfg, device)
    e, n = cfg.evaluate, train_split.num_classes
    return {
        "knn_top1": knn_top1(train_f, train_y, test_f, test_y, n, e.knn.k, e.knn.temperature),
        "linear_top1": linear_top1(train_f, train_y, test_f, test_y, n, e.linear.epochs, e.linear.lr,
                                   e.linear.batch_size, e.linear.weight_decay, cfg.seed),
    }
