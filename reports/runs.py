"""What a report reads off a tracked point run, from its MLflow params and metrics alone (no job folders).

Shared by one sweep's report (reports/build.py, which first picks the runs of a planned launch) and the
site over a whole store (reports/site.py, which groups the runs it finds). Params are the run's flattened
resolved config as MLflow keeps them: strings, lists as JSON (core/tracking/runs.py create_point_run).
"""
from __future__ import annotations

import functools
import json
import math

from core.config import CONFIG_DIR, flatten

# Test-split sizes of the data sources whose size the config alone decides (the embedded subset ships
# 2,000 test images; Debian's Fashion-MNIST has 10,000). An image folder's size is known only to its job.
TEST_SPLIT = {"embedded": 2000, "fashion_mnist": 10000}
VARIES = "varies"  # a caption value that differs between the points (it is what the sweep sweeps)


def as_params(cfg) -> dict[str, str]:
    """A composed config (or its core.config.flatten) as the strings MLflow keeps for a run (the same
    conversion as create_point_run)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(cfg).items()}


def test_images(params: dict) -> float:
    """The number of test images the run's accuracies were measured on: data.test_limit, capped by the
    split's size where the source fixes it; NaN when unknown (an image folder without a limit)."""
    size = TEST_SPLIT.get(params.get("data.source", ""))
    try:
        limit = int(params.get("data.test_limit", "None"))
    except ValueError:  # "None": the whole split
        limit = None
    if limit is None:
        return float(size) if size else math.nan
    return float(min(limit, size) if size else limit)


@functools.lru_cache(maxsize=1)
def smoke_settings() -> dict[str, str]:
    """The keys preset=smoke sets (sweeps/conf/preset/smoke.yaml), as param strings."""
    from omegaconf import OmegaConf
    return as_params(OmegaConf.load(CONFIG_DIR / "preset" / "smoke.yaml"))


def is_smoke(params: dict) -> bool:
    """A run made with preset=smoke: at least half of the smoke preset's settings (steps, data limits,
    epochs, ...) are the run's own. A launch may override one or two of them and stay a rehearsal; a real
    run shares one or two of them by chance (a batch size) but not half."""
    settings = smoke_settings()
    same = sum(params.get(k) == v for k, v in settings.items())
    return same * 2 >= len(settings)


def params_of(data) -> dict:
    """A run's params with its cluster keys: a launch tags those `mimsweep.cluster.*` instead of logging them
    as params (core/tracking/runs.py: operational keys are no params); runs of earlier versions have them as
    params."""
    from core import tracking
    tags = {k[len(tracking.TAG):]: v for k, v in data.tags.items() if k.startswith(tracking.TAG + "cluster.")}
    return {**data.params, **tags}


def devices(params: dict, evaluation: bool) -> int:
    """Devices one task of this run held: the SLURM profile's GPUs per task (`cluster.eval.*` for an
    evaluation task), 1 for a CPU job or a local run."""
    if params.get("cluster.backend") != "slurm":
        return 1
    try:
        return max(int(float(params.get("cluster.eval.gpus_per_task" if evaluation else "cluster.gpus_per_task")
                             or 0)), 1)
    except ValueError:  # "None": no GPUs asked for
        return 1


def run_device_h(metrics: dict, params: dict, evaluation_only: bool) -> float:
    """A run's own cost in device-hours: its wall time x devices per task. A run that evaluates another's
    pre-training costs its evaluation task; a pre-training task of its own (`pretrain_job_wall_s`, then an
    evaluation task's `wall_s`) counts both. NaN without a wall time (runs of old versions)."""
    wall = metrics.get("wall_s", float("nan"))
    if evaluation_only:
        return wall * devices(params, True) / 3600
    if "pretrain_job_wall_s" in metrics:  # pre-training and evaluation were separate tasks
        return (metrics["pretrain_job_wall_s"] * devices(params, False) + wall * devices(params, True)) / 3600
    return wall * devices(params, False) / 3600


def cost_basis(params: list[dict]) -> str:
    """The caption's word on what a device is, from the runs' cluster profiles."""
    said = []
    for pr in params:
        if pr.get("cluster.backend") != "slurm":
            text = "1 per local run"
        else:
            g = devices(pr, False)
            text = f"{g} GPU(s) per SLURM task" if str(pr.get("cluster.gpus_per_task")) not in ("0", "None") \
                else "1 per SLURM CPU job"
        if text not in said:
            said.append(text)
    return "; ".join(said)


def describe(params: list[dict], uses_teacher: bool | None = None, recipe_known: bool = False) -> str:
    """One line saying what "ours" is, from the points' params; what differs between points is the swept
    setting and is said to vary rather than quoting the first point's value. `uses_teacher`: whether any
    point builds a teacher (core.methods.uses_teacher); None = judge by `method.target=teacher`, the rule
    of every shipped method (the site does not import the methods). `recipe_known`: the params come from
    composed configs, which hold `recipe.*` (a run's params do not: the recipe's values are its own keys),
    so a plan without a recipe says so."""
    def value(key: str) -> str:
        vals = {pr.get(key, "None") for pr in params}
        return vals.pop() if len(vals) == 1 else VARIES

    n_train, n_test = value("data.train_limit"), value("data.test_limit")
    steps, scale = value("pretrain.max_steps"), value("pretrain.epochs_scale")
    parts = [
        f"{value('model.name')} (depth {value('model.depth')}, width {value('model.embed_dim')}, "
        f"patch {value('model.patch_size')}, {value('model.input_size')} px)",
        f"method {value('method.name')}",
        f"{value('data.name')} ({'all' if n_train == 'None' else n_train} train / "
        f"{'all' if n_test == 'None' else n_test} test images)",
        ("epochs swept" if value("pretrain.epochs") == VARIES else f"{value('pretrain.epochs')} epoch(s)")
        + {"None": "", VARIES: " x a per-point pretrain.epochs_scale"}.get(scale, f" x {scale}")
        + ("" if steps == "None" else f", at most {steps} steps")
        + f", batch {value('pretrain.batch_size')}",
    ]
    if uses_teacher is None:
        uses_teacher = any(pr.get("method.target") == "teacher" for pr in params)
    if uses_teacher:
        parts.append(f"teacher {value('teacher.model')} ({value('teacher.pretrained')})")
    parts.append(f"target {value('method.target')}")
    recipes = sorted({pr["recipe.name"] for pr in params if pr.get("recipe.name", "None") != "None"})
    if recipes or recipe_known:
        parts.append("recipe: " + ("; ".join(recipes) + " (sweeps/conf/recipe/)" if recipes
                                   else "none (a paper's recipe runs with preset=paper)"))
    if value("task") == "flops":
        del parts[2:4]  # no data is read and nothing is trained
        parts.append("FLOPs per image of the transformer blocks, counted by torch's FlopCounterMode, beside "
                     "the paper's cost model")
    else:
        parts.append(f"k-NN / linear: top-1 % on frozen {value('evaluate.pool')}-pooled features "
                     f"(k-NN k={value('evaluate.knn.k')}, linear probe {value('evaluate.linear.epochs')} ep)")
        protocols = set()
        for pr in params:
            try:
                protocols |= set(json.loads(pr.get("evaluate.protocols", "[]")))
            except (ValueError, TypeError):
                pass
        if "finetune" in protocols:
            parts.append(f"fine-tune: {value('evaluate.finetune.epochs')} ep end to end, "
                         f"{value('evaluate.finetune.pool')} pool")
        if "seg_linear" in protocols:
            parts.append(f"seg. mIoU: 1x1-conv probe on frozen block {value('evaluate.seg_linear.layer')} features")
    return "; ".join(parts) + "."


def row_of(run, label: str, seed, trainer: tuple | None = None) -> dict:
    """One table row of a finished point run: label, seed, run_id, its metrics (a run that only evaluated
    another's pre-training also gets that trainer's metrics it lacks), `test_images`, its own `device_h`,
    and for an evaluation-only run `pretrained_by` / `pretrain_device_h`. `trainer`: (metrics, device_h)
    of the run it evaluates, if any."""
    from core import tracking

    metrics = dict(run.data.metrics)
    by = run.data.tags.get(tracking.TAG + "pretrained_by")
    row = {"label": label, "seed": seed, "run_id": run.info.run_id,
           "device_h": run_device_h(metrics, params_of(run.data), bool(by)), "test_images": test_images(run.data.params)}
    if by:  # evaluation only: the pre-training's own figures (pretrain_wall_s, epoch_s, ...) are its trainer's
        t_metrics, t_cost = trainer or ({}, float("nan"))
        row.update(pretrained_by=by, pretrain_device_h=t_cost)
        metrics = {**t_metrics, **metrics}
    return {**metrics, **row}
