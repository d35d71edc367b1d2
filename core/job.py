"""One grid point, start to finish: pre-train (resuming if a checkpoint exists), evaluate, track.

This is the function a local launch calls in-process and a SLURM task calls on its node; it knows the
MLflow run it writes into but nothing about sweeps, grids or reports.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core import tracking


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)


def run_point(cfg, run_id: str, uri: str, workdir: str, should_stop=lambda: False) -> dict:
    """cfg: resolved point config (DictConfig or YAML text). Returns the evaluation metrics."""
    from core.data import load_split
    from core.evaluate import evaluate
    from core.teachers import build_teacher
    from core.train import NonFiniteLoss, Preempted, build_model, pretrain

    cfg = OmegaConf.create(cfg) if isinstance(cfg, str) else cfg
    c = tracking.client(uri)
    log = tracking.MetricLog(c, run_id)
    c.update_run(run_id, status="RUNNING")
    t0 = time.perf_counter()
    try:
        device = pick_device(cfg.device)
        train_split, test_split = load_split(cfg.data, "train"), load_split(cfg.data, "test")
        teacher = build_teacher(cfg.teacher).to(device) if cfg.method.target == "teacher" else None
        model = build_model(cfg, teacher).to(device)
        stats = pretrain(cfg, model, teacher, train_split, Path(workdir) / "checkpoint.pt", log, device,
                         should_stop)
        results = evaluate(model.encoder, cfg, train_split, test_split, device)
        if cfg.evaluate.floor:  # same architecture and seed, untrained: what pre-training has to beat
            floor = evaluate(build_model(cfg, teacher).encoder.to(device), cfg, train_split, test_split, device)
            results.update({f"floor_{k}": v for k, v in floor.items()})
        results.update(pretrain_wall_s=stats["wall_s"], pretrain_img_s=stats["img_per_s"],
                       wall_s=time.perf_counter() - t0)
        for k, v in results.items():
            log(k, v, stats["steps"])
        log.flush()
        if stats["resumed_from"]:
            log.tag("resumed_from_step", str(stats["resumed_from"]))
        c.set_terminated(run_id, "FINISHED")
        return results
    except Preempted:
        log.flush()
        c.update_run(run_id, status="SCHEDULED")  # waits for its requeued job; not failed, not finished
        raise
    except BaseException as e:
        log.flush()
        reason = "non-finite loss" if isinstance(e, NonFiniteLoss) else type(e).__name__
        log.tag("failure", f"{reason}: {e}"[:5000])
        c.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
