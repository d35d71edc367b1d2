"""Pre-training: model construction, AdamW + warm-up/cosine, checkpoints, exact resume.

A checkpoint holds everything the next step depends on -- model, optimiser, scheduler, grad scaler,
every RNG state and the step -- and is written atomically (temp file + rename), so a job killed at any
instant leaves either the previous checkpoint or the new one, never half a file. The data order is a
pure function of (seed, step) (core/data.py), so a resumed job ends bit-for-bit where an uninterrupted
one would (tests/test_resume.py proves it on CPU).
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from core import data as data_lib
from core.targets import make_targets, target_dim
from core.vit import ViTEncoder


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: the run stops as failed with this reason."""


class Preempted(RuntimeError):
    """Asked to stop (signal before a time limit / preemption) after writing a checkpoint."""


def build_encoder(cfg) -> ViTEncoder:
    m = cfg.model
    return ViTEncoder(m.input_size, m.patch_size, cfg.data.channels, m.embed_dim, m.depth, m.num_heads,
                      m.mlp_ratio, m.drop_path)


def build_model(cfg, teacher=None) -> nn.Module:
    """The method's model (encoder + decoder), seeded by cfg.seed so the same point gets the same init."""
    from core.mae import MAE
    from core.mcm import MCM

    torch.manual_seed(cfg.seed)
    enc = build_encoder(cfg)
    meth = cfg.method
    tdim = target_dim(meth.target, cfg.model.patch_size, cfg.data.channels, teacher)
    common = dict(mask_ratio=meth.mask_ratio, decoder_dim=meth.decoder_dim, decoder_depth=meth.decoder_depth,
                  decoder_heads=meth.decoder_heads, mlp_ratio=cfg.model.mlp_ratio)
    if meth.name == "mae":
        return MAE(enc, tdim, **common)
    return MCM(enc, tdim, masking=meth.masking, encode_channel_forward=meth.encode_channel_forward,
               recon_range=meth.recon_range, **common)


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, tokens and the learnable encode/mask channels."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("_token", "_channel")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.pretrain.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.pretrain.betas))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float):
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def schedule(cfg, num_train: int, world_size: int = 1) -> tuple[int, int, float]:
    """-> (total optimiser steps, warm-up steps, peak lr) for this point."""
    per_rank = cfg.pretrain.batch_size // world_size
    spe = data_lib.steps_per_epoch(num_train, per_rank, world_size)
    total = cfg.pretrain.epochs * spe
    if cfg.pretrain.max_steps:
        total = min(total, cfg.pretrain.max_steps)
    warmup = min(int(round(cfg.pretrain.warmup_epochs * spe)), total)
    return total, warmup, cfg.pretrain.base_lr * cfg.pretrain.batch_size / 256


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temp file in the same folder, fsync, rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def train_step(cfg, net: nn.Module, opt, scaler, imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               teacher=None, amp_dtype=None, target_ctx=nullcontext(), student_ctx=nullcontext()) -> torch.Tensor:
    """One optimiser step on imgs: [B, C, H, W] in [0, 1]; returns the loss (detached).

    The contexts wrap target computation and the student's forward/backward apart (bench/ counts FLOPs
    of each). A non-finite loss skips the update and is returned for the caller to act on."""
    x = (imgs - mean) / std
    with target_ctx:
        # Pixel targets come from the normalised input (as MAE); a teacher sees the raw image.
        target = make_targets(cfg.method.target, imgs if cfg.method.target == "teacher" else x,
                              cfg.model.patch_size, teacher)
    with student_ctx:
        with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = net(x, target)
        if not torch.isfinite(loss):
            return loss.detach()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    if cfg.pretrain.grad_clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(net.parameters(), cfg.pretrain.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def pretrain(cfg, model: nn.Module, teacher, train_split, ckpt_path: Path, log, device: torch.device,
             should_stop=lambda: False, rank: int = 0, world_size: int = 1, ddp_model=None) -> dict:
    """Train until the schedule ends, resuming from `ckpt_path` if it exists.

    log(key, value, step) buffers a metric; log.flush() sends the buffer (done at every checkpoint, so
    what MLflow holds always matches a checkpoint and a resumed run never logs a step twice).
    Returns {'steps', 'resumed_from', 'wall_s', 'img_per_s'}.
    """
    p = cfg.pretrain
    total, warmup, lr = schedule(cfg, len(train_split.dataset), world_size)
    opt = build_optimizer(model, cfg, lr)
    sched = build_scheduler(opt, total, warmup, p.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=p.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.precision)
    step, ckpt = 0, load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    resumed_from = step
    net = ddp_model or model

    def checkpoint():
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                        "rng": rng_state(), "step": step})
        log.flush()

    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    loader = data_lib.pretrain_loader(train_split, cfg.data, cfg.model.input_size, p.batch_size // world_size, cfg.seed, step, total,
                                      rank, world_size)
    model.train()
    bar = _progress(total, step, rank)
    t_start, t_window, n_window, n_total = time.perf_counter(), time.perf_counter(), 0, 0
    for imgs, _ in loader:
        imgs = imgs.to(device, non_blocking=True)
        loss = train_step(cfg, net, opt, scaler, imgs, mean, std, teacher, amp_dtype)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step + 1}")
        step += 1
        sched.step_update(step)
        n_window += imgs.shape[0] * world_size
        n_total += imgs.shape[0] * world_size
        if step % p.log_every == 0 or step == total:
            now = time.perf_counter()
            log("train_loss", loss.item(), step)
            log("lr", opt.param_groups[0]["lr"], step)
            log("throughput_img_s", n_window / max(now - t_window, 1e-9), step)
            log("progress", step / total, step)
            t_window, n_window = now, 0
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if step % p.checkpoint_every == 0 or step == total:
            checkpoint()
        if _agree(should_stop(), world_size, device) and step < total:
            checkpoint()
            bar.close()
            raise Preempted(f"stopped at step {step}/{total} after a checkpoint")
    bar.close()
    wall = time.perf_counter() - t_start
    return {"steps": step, "total_steps": total, "resumed_from": resumed_from, "wall_s": wall,
            "img_per_s": n_total / wall if n_total else math.nan}


def _agree(flag: bool, world_size: int, device) -> bool:
    """Under DDP every rank must stop at the same step: stop if any rank was signalled."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _progress(total: int, start: int, rank: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="pretrain", unit="step", mininterval=2.0,
                disable=rank != 0 or os.environ.get("MIMSWEEP_PROGRESS", "1") == "0", dynamic_ncols=True)
