"""One grid point, start to finish: pre-train (resuming if a checkpoint exists), evaluate, track.

This is the function a local launch calls in-process and a SLURM task calls on its node; it knows the
MLflow run it writes into but nothing about sweeps, grids or reports. `validate` is the one check of a
point's resolved config, run by the planner before anything is created: each part checks its own keys.

Distributed: when the environment says there are several processes (SLURM_NTASKS under srun, or
torchrun's WORLD_SIZE), each process trains a shard of every batch under DistributedDataParallel
(NCCL on GPUs, gloo on CPU); only rank 0 writes checkpoints and talks to MLflow, and it evaluates alone.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core import config, methods, tracking

PHASES = ("all", "pretrain", "evaluate")


def validate(cfg) -> None:
    """Raise ConfigError (core.config) on the first bad value of a resolved point config: each part checks
    its own keys (the method its `method.*`, the teacher only when the method asks for one)."""
    from core.evaluation import evaluate as evaluation
    from core.targets import teachers
    from core.training import data

    config.check_model(cfg)
    recipe = cfg.get("recipe")
    config.check(recipe is None or recipe.get("name") is not None, "method.name", cfg.method.name,
                 "has no recipe for preset=paper", "Add sweeps/conf/recipe/paper_<method config>.yaml (docs/methods.md).")
    method = methods.get(cfg.method.name)
    method.check(cfg)
    data.check_config(cfg)
    request = method.teacher_request(cfg)
    if request is not None:
        teachers.check_config(cfg, request)
    config.check_pretrain(cfg)
    evaluation.check_config(cfg)
    config.check_run(cfg)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def init_distributed(rank: int, world: int, device: torch.device) -> None:
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # single-node jobs (the array tasks here)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)


def log_artifacts(c, run_id: str, model, teacher, split, cfg, device) -> None:
    """After pre-training: the method's pictures (attention maps, ...) of a few test images as PNGs in
    `figures/`, and the encoder as a timm state_dict in `encoder/` (`timm.create_model(name,
    checkpoint_path=".../timm_state_dict.pth", **timm_kwargs.json)`; what detectron2/mmseg backbones take), whose
    pooled output is the evaluation's feature (`evaluate.pool`, of the last block)."""
    import json
    import tempfile

    from core.training.data import Plain
    view = Plain(split.dataset, cfg.model.input_size)
    imgs = torch.stack([view[i][0] for i in range(min(8, len(view)))]).to(device)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        files = model.artifacts(imgs, (imgs - mean) / std, teacher)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        if files:
            c.log_artifacts(run_id, tmp, "figures")
        export = Path(tmp) / "encoder"
        export.mkdir()
        torch.save(model.encoder.timm_state_dict(), export / "timm_state_dict.pth")
        (export / "timm_kwargs.json").write_text(json.dumps(
            {"model_name": "vit_base_patch16_224", **model.encoder.timm_kwargs(cfg.evaluate.pool)}, indent=1))
        c.log_artifacts(run_id, str(export), "encoder")


def _count_flops(cfg, run_id: str, c, log) -> dict:
    """task=flops: FLOPs per image instead of training (core/evaluation/flops.py); the run ends FINISHED."""
    from core.evaluation import flops
    from core.targets.teachers import build_teacher
    needs_teacher = methods.uses_teacher(cfg)
    results = flops.count(cfg, build_teacher(cfg.teacher) if needs_teacher else None)
    for k, v in results.items():
        log(k, v, 0)
    log.flush()
    tracking.patiently(tracking.set_status, c, run_id, "FINISHED", wait_s=log.wait_s, what="run status")
    return results


def run_point(cfg, run_id: str, uri: str, workdir: str, should_stop=lambda: False, phase: str = "all",
              checkpoint: str | None = None, queue_s: float | None = None) -> dict:
    """cfg: resolved point config (DictConfig or YAML text). Returns the evaluation metrics (rank 0).

    `queue_s`: how long the job waited between its launch handing it over and its start (the backend knows
    it), logged with the results as the metric `queue_s` (`pretrain_queue_s` for a pre-training-only task).
    The data it reads are logged as the run's dataset inputs (once: the store drops repeats).

    phase `evaluate` reads a finished pre-training checkpoint and trains nothing: `checkpoint` (another run's,
    whose pre-training signature is this point's: core/tracking/identity.py), else this run's own in `workdir`.
    A run that completes its pre-training records the checkpoint's absolute path in the tag
    `mimsweep.checkpoint`: later points of any sweep with the same pre-training signature evaluate it."""
    from core.training.data import describe, load_split
    from core.evaluation.evaluate import evaluate
    from core.targets.teachers import build_teacher
    from core.training.loop import (NonFiniteLoss, Preempted, build_model, load_checkpoint, pretrain, schedule,
                            upgrade_state_dict)

    cfg = OmegaConf.create(cfg) if isinstance(cfg, str) else cfg
    rank, world, local_rank = dist_env()
    lead = rank == 0
    c = tracking.job_client(uri)
    wait = float(cfg.tracking.get("outage_wait_s", 0) or 0)
    log = tracking.MetricLog(c, run_id, enabled=lead, spool=Path(workdir) / "metrics.spool.jsonl", wait_s=wait)

    def status(st: str, reason: str | None = None) -> None:
        if lead:
            tracking.patiently(tracking.set_status, c, run_id, st, reason, wait_s=wait, what=f"run status {st}")

    status("RUNNING")
    log.drain()  # what an earlier job of this run spooled during an outage
    t0 = time.perf_counter()
    try:
        device = pick_device(cfg.device, local_rank)
        if world > 1:
            init_distributed(rank, world, device)
        if cfg.get("task") == "flops":
            return _count_flops(cfg, run_id, c, log)
        train_split, test_split = load_split(cfg.data, "train"), load_split(cfg.data, "test")
        datasets = [describe(cfg.data, "train", train_split), describe(cfg.data, "test", test_split)]
        if lead:
            tracking.patiently(tracking.log_datasets, c, run_id, datasets, wait_s=wait, what="dataset inputs")
        ckpt = Path(checkpoint) if phase == "evaluate" and checkpoint else Path(workdir) / "checkpoint.pt"
        total = schedule(cfg, len(train_split.dataset), world)[0]
        state = None
        if phase == "evaluate":
            state = load_checkpoint(ckpt)
            if state is None or state["step"] < total:
                raise RuntimeError(f"evaluation needs a finished pre-training checkpoint at {ckpt}")
        needs_teacher = methods.uses_teacher(cfg)
        teacher = build_teacher(cfg.teacher).to(device) if needs_teacher else None
        model = build_model(cfg, teacher).to(device)
        if state is not None:  # evaluation only: the weights, nothing of the pre-training's run state or metrics
            model.load_state_dict(upgrade_state_dict(model, state["model"]))
            stats = {"steps": state["step"], "resumed_from": state["step"]}
        else:
            ddp = None
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel
                ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            stats = pretrain(cfg, model, teacher, train_split, ckpt, log, device, should_stop, rank, world, ddp)
            if lead and stats["steps"] >= total and ckpt.is_file():  # finished: others may evaluate it
                log.tag("checkpoint", str(ckpt.resolve()))
        del state
        results = {}
        if lead and phase != "evaluate" and stats["steps"] > stats["resumed_from"]:
            tracking.patiently(log_artifacts, c, run_id, model, teacher, test_split, cfg, device, wait_s=wait,
                               what="artifacts")
        if phase != "pretrain" and lead:
            results = evaluate(model.encoder, cfg, train_split, test_split, device, workdir=workdir, run_id=run_id)
            if cfg.evaluate.floor:  # same architecture and seed, untrained: computed once per key (core/evaluation/floors.py)
                from core.evaluation.floors import floor_metrics
                floor, floor_runs = floor_metrics(c, run_id, uri, model.encoder, cfg, train_split, test_split,
                                                  device, datasets)
                results.update(floor)
                if floor_runs:
                    log.tag("floor_runs", json.dumps(floor_runs, sort_keys=True))
        if phase != "evaluate" and stats["steps"] > stats["resumed_from"]:
            # epoch_s: one pass over the training split at this run's measured rate (MaskAlign Tab. 7)
            results.update(pretrain_wall_s=stats["wall_s"], pretrain_img_s=stats["img_per_s"],
                           epoch_s=len(train_split.dataset) / stats["img_per_s"])
        # wall_s is the whole point's; a pre-training-only task reports its own share under another name
        results["pretrain_job_wall_s" if phase == "pretrain" else "wall_s"] = time.perf_counter() - t0
        if queue_s is not None:  # with the results, not first: MLflow's Compare opens on a run's first metric
            results["pretrain_queue_s" if phase == "pretrain" else "queue_s"] = max(queue_s, 0.0)
        # A job that evaluates again after its results arrived (killed before its final status) logs none twice.
        done = tracking.patiently(tracking.logged_at, c, run_id, list(results), stats["steps"], wait_s=wait,
                                  what="metric history") if lead and stats["resumed_from"] else set()
        for k, v in results.items():
            if k not in done:
                log(k, v, stats["steps"])
        log.flush()
        if lead and not log.drain():
            raise tracking.TrackingUnavailable(
                f"the tracking store did not answer for {wait:.0f} s (tracking.outage_wait_s); the metrics wait in "
                f"{log.spool} and are sent by the next job of this run. Relaunch the sweep when the server is back")
        if lead and stats["resumed_from"] and phase != "evaluate":
            log.tag("resumed_from_step", str(stats["resumed_from"]))
        status("SCHEDULED" if phase == "pretrain" else "FINISHED")  # SCHEDULED: waits for its evaluation task
        return results
    except Preempted:
        log.flush()  # the checkpoint before Preempted covers every buffered step
        status("SCHEDULED")  # waits for its requeued job; not failed, not finished
        raise
    except BaseException as e:
        log.drop()  # steps after the last checkpoint: the resumed job logs them, once
        if isinstance(e, tracking.TrackingUnavailable):
            raise  # the store cannot be told; the next job of this run sends the spool and ends it
        reason = "non-finite loss" if isinstance(e, NonFiniteLoss) else type(e).__name__
        try:
            status("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{reason}: {e}")
        except tracking.TrackingUnavailable as te:
            print(f"[mimsweep] {te}", flush=True)
        raise
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
