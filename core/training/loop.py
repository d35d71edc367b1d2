"""Pre-training: model construction, AdamW + warm-up/cosine, checkpoints, exact resume.

Nothing here knows a method by name: the method (core/methods/base.py) builds its model, its targets and its
loss; this module runs the steps. A checkpoint holds everything the next step depends on -- model,
optimiser, grad scaler, every rank's RNG states and the step -- and is written atomically (temp file +
rename), so a job killed at any instant leaves either the previous checkpoint or the new one, never half
a file. The data order is a pure function of (seed, step) (core/training/data.py) and so is the masking
generator's seed (`mask_seed`), so a resumed job ends bit-for-bit where an uninterrupted one would
(tests/test_resume.py proves it on CPU). The learning rate is a pure function of the step too (`lr_at`).
"""
from __future__ import annotations

import errno
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from core.training import data as data_lib
from core import faults
from core import methods
from core.methods.base import Method
from core.vit import upgrade_state_dict


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: the run stops as failed with this reason."""


class Preempted(RuntimeError):
    """Asked to stop (signal before a time limit / preemption) after writing a checkpoint."""


def build_model(cfg, teacher=None) -> Method:
    """The method's model, seeded by cfg.seed so the same point gets the same init. Parameters the
    config leaves unused are frozen: DDP then does not wait for gradients that never come."""
    torch.manual_seed(cfg.seed)
    model = methods.get(cfg.method.name).build(cfg, teacher)
    unused = model.unused_parameters()
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return model


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW through timm: no weight decay on 1-D parameters, biases and the method's
    `no_weight_decay()` names; the lr is set every step by `set_lr` (honours timm's `lr_scale`).
    On CUDA the fused kernel (one launch for every parameter), elsewhere the multi-tensor (foreach) one:
    the same update as the per-parameter loop, fewer kernel launches / Python iterations."""
    from timm.optim import create_optimizer_v2
    on_cuda = next(model.parameters()).is_cuda
    speed = {"fused": True} if on_cuda else {"foreach": True}
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.pretrain.weight_decay,
                               betas=tuple(cfg.pretrain.betas), **speed)


def compile_enabled(cfg, device: torch.device) -> bool:
    """`pretrain.compile`: true / false, or auto = on CUDA only (on a CPU the compile time is not won
    back within a laptop-sized run)."""
    c = cfg.pretrain.get("compile", "auto")
    return device.type == "cuda" if c == "auto" else bool(c)


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """The lr of optimiser step `step` (0-based) of `total`: linear warm-up from 0 over `warmup` steps,
    then a half cosine that reaches `min_lr` exactly at the last step (MAE's lr_sched, per iteration)."""
    if step < warmup:
        return peak * step / warmup
    span = total - 1 - warmup
    progress = min((step - warmup) / span, 1.0) if span > 0 else 1.0
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def schedule(cfg, num_train: int, world_size: int = 1) -> tuple[int, int, float]:
    """-> (total optimiser steps, warm-up steps, peak lr) for this point."""
    per_rank = cfg.pretrain.batch_size // world_size
    spe = data_lib.steps_per_epoch(num_train, per_rank, world_size)
    scale = cfg.pretrain.get("epochs_scale", 1.0)   # a point's share of the recipe's length (MaskAlign Tab. 4)
    total = max(int(round(cfg.pretrain.epochs * scale * spe)), 1)
    if cfg.pretrain.max_steps:
        total = min(total, cfg.pretrain.max_steps)
    warmup = min(int(round(cfg.pretrain.warmup_epochs * scale * spe)), total)
    return total, warmup, cfg.pretrain.base_lr * cfg.pretrain.batch_size / 256


def mask_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the masking generator at a step: every rank draws its own masks, a resumed job the same."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63)


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


def all_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG states (drop path and dropout draw from them), gathered for rank 0's checkpoint."""
    mine = rng_state()
    if world_size == 1:
        return [mine]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


class DiskFull(OSError):
    """The checkpoint did not fit on its filesystem; the previous checkpoint is intact."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temp file in the same folder, fsync, rename over the old checkpoint. A write that
    fails (a full disk) removes its temp file and leaves the previous checkpoint as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _no_space(e):  # torch reports it as "unexpected pos ..." with the OSError as its context
            import shutil
            free = shutil.disk_usage(path.parent).free / 2 ** 20
            raise DiskFull(errno.ENOSPC, f"no space left on the device of {path.parent} for the checkpoint "
                           f"({free:.0f} MiB free). Free space or move output_root, then relaunch: the run "
                           "resumes from its last checkpoint") from None
        raise


def _no_space(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temps(path: Path) -> list[Path]:
    """Temp files of checkpoint writes killed before their rename (`.NAME.PID.tmp`): removed at start."""
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def all_finite(bad_step: torch.Tensor, world_size: int = 1) -> int:
    """Read back the device-side record of non-finite losses (`bad_step`: the first step since the last
    check whose loss was NaN/inf, 0 if none) and agree across ranks: -> that step on some rank, 0 if every
    rank was finite. The one host-device synchronisation of the loop, at log and checkpoint steps; under
    DDP all ranks reach it at the same step and stop together."""
    flag = bad_step.detach().reshape(1).to(torch.int64)
    if world_size > 1:
        flag = flag.clone()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag[0])


def train_step(model, net: nn.Module, opt, scaler, imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               teacher=None, amp_dtype=None, grad_clip: float | None = None, world_size: int = 1,
               target_ctx=nullcontext(), student_ctx=nullcontext()) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on imgs: [B, C, H, W] in [0, 1]; returns (the loss, detached; a device-side bool,
    whether it was finite on this rank). `model` is the Method, `net` what runs it (the DDP wrapper, the
    compiled model or the model). Nothing is read back to the host: the caller checks the flags only at
    log and checkpoint steps (`all_finite`), so an update from a non-finite loss may be applied in memory,
    but the run stops before any checkpoint holds it.

    The contexts wrap target computation and the student's forward/backward apart (bench/ counts FLOPs
    of each)."""
    x = (imgs - mean) / std
    with target_ctx:
        targets = model.make_targets(imgs, x, teacher)
    with student_ctx:
        with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = net(x, targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(opt)
    scaler.update()
    loss = loss.detach()
    return loss, torch.isfinite(loss).all()


def pretrain(cfg, model: nn.Module, teacher, train_split, ckpt_path: Path, log, device: torch.device,
             should_stop=lambda: False, rank: int = 0, world_size: int = 1, ddp_model=None) -> dict:
    """Train until the schedule ends, resuming from `ckpt_path` if it exists.

    log(key, value, step) buffers a metric; every checkpoint carries `log.pending()` and is followed by
    `log.flush()`, and a resume `log.replay()`s what its checkpoint carries: the tracker holds every step
    up to the last checkpoint exactly once (core/tracking/runs.py MetricLog says how).
    Returns {'steps', 'resumed_from', 'wall_s', 'img_per_s'}.
    """
    p = cfg.pretrain
    total, warmup, lr = schedule(cfg, len(train_split.dataset), world_size)
    opt = build_optimizer(model, cfg, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=p.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.precision)
    if rank == 0:
        remove_stale_temps(ckpt_path)
    step, ckpt = 0, load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(upgrade_state_dict(model, ckpt["model"]))
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank (older: one)
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        step = ckpt["step"]
        log.replay(ckpt.get("metrics", []))  # lost if the last job died between this checkpoint and its flush
    resumed_from = step
    net = ddp_model or model
    if compile_enabled(cfg, device):  # the training forward (+ its backward); `model` keeps the weights
        net = torch.compile(net)

    def checkpoint():
        states = all_rng_states(world_size)
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scaler": scaler.state_dict(), "rng": states, "step": step,
                                        "metrics": log.pending()})
        faults.point("checkpoint.renamed")
        log.flush()

    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    loader = data_lib.pretrain_loader(train_split, cfg.data, cfg.model.input_size, p.batch_size // world_size, cfg.seed, step, total,
                                      rank, world_size)
    model.train()
    bar = _progress(total, step, rank)
    t_start, t_window, n_window, n_total = time.perf_counter(), time.perf_counter(), 0, 0
    bad_step = torch.zeros((), dtype=torch.int64, device=device)  # first non-finite step since the last check

    def check_finite(loss):
        """At log / checkpoint / stop steps only: stop before a checkpoint could hold a bad update."""
        bad = all_finite(bad_step, world_size)
        if bad:
            raise NonFiniteLoss(f"loss is {loss.item()} on this rank at step {step}; first not finite at step "
                                f"{bad} on some rank")
        bad_step.zero_()

    for imgs, _ in loader:
        imgs = data_lib.to_device(imgs, device)
        lr_now = lr_at(step, total, warmup, lr, p.min_lr)
        set_lr(opt, lr_now)
        model.seed(mask_seed(cfg.seed, rank, step))
        loss, finite = train_step(model, net, opt, scaler, imgs, mean, std, teacher, amp_dtype, p.grad_clip,
                                  world_size)
        step += 1
        faults.pace("train.step")
        bad_step.copy_(torch.where((bad_step == 0) & ~finite, step, bad_step))
        n_window += imgs.shape[0] * world_size
        n_total += imgs.shape[0] * world_size
        if step % p.log_every == 0 or step % p.checkpoint_every == 0 or step == total:
            check_finite(loss)
        if step % p.log_every == 0 or step == total:
            now = time.perf_counter()
            log("train_loss", loss.item(), step)
            log("lr", lr_now, step)
            log("throughput_img_s", n_window / max(now - t_window, 1e-9), step)
            log("progress", step / total, step)
            t_window, n_window = now, 0
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if step % p.checkpoint_every == 0 or step == total:
            checkpoint()
        if _agree(should_stop(), world_size, device) and step < total:
            check_finite(loss)
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
