"""The `knn` protocol: DINO's weighted k-NN on frozen features (cosine similarity, the k nearest training
features vote with weight exp(sim / T); k=20, T=0.07 by default)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
