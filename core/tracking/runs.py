"""The MLflow layout of a sweep: which runs exist, what they carry, and how a launch finds them again.

- one experiment per sweep (named after it), a *parent* run per launch, a *child* run per grid point;
- the experiment: kind `custom_model_development` (tag `mlflow.experimentKind`: a model-training experiment,
  not GenAI) and a description (tag `mlflow.note.content`: the sweep's title, the paper table it rebuilds,
  the latest launch command and the report command): `describe_experiment`. MLflow 3.17's UI picks the
  runs or traces view from its own GenAI / Model training switch, not from the kind: the link a launch
  prints sets it (store.ui_link);
- the launch run: named `<sweep> launch <time>`, its description the launch command; reports/build.py
  attaches the report's files to the latest one (artifact folder `report/`);
- a child run is named for its point (`mask_ratio=60% seed=0`, `num_proxies=2 seed=0`, or for a run without
  a sweep its overrides: sweeps/grid.py, sweeps/plan.py). A local launch creates it when its job starts, so
  MLflow's start time and duration are the job's (a SLURM point's run is created at submission: the queue
  outlives the launch); `queue_s` says how long the job waited (cluster/local.py, cluster/task.py);
- child params: the flattened resolved config without the operational keys (core.config.RUN_ONLY: where
  and how it runs: cluster.*, tracking.*, output_root, dry_run, device, ...), with the config's own key
  names (`method.mask_ratio`); the whole resolved config, those keys included, is the `config.yaml` artifact.
  What the report needs of them is a tag: `mimsweep.cluster.backend`, `mimsweep.cluster.gpus_per_task`,
  `mimsweep.cluster.eval.gpus_per_task`;
- child tags: sweep, row label, the point's overrides, git commit/dirty, host, launch, and its identity
  (core/tracking/identity.py): `pretrain_signature`, `eval_signature`, the legacy `signature`; `checkpoint`
  (the absolute path of the finished pre-training's checkpoint, set by the job that trained it) or, on a run
  that only evaluates another's pre-training, `pretrained_by` (that run's id) and `pretrained_checkpoint`;
- child metrics: `train_loss`/`lr`/`throughput_img_s` per logged step (sent in batches at every
  checkpoint, never one blocking call per step: core/tracking/metrics.py), `knn_top1`, `linear_top1`,
  their `floor_` twins at random init, `pretrain_wall_s`, `wall_s`, `queue_s` (logged with the results, not
  first: MLflow's Compare opens its plot on a run's first metric, which stays `train_loss`);
- child inputs: the datasets the run read (`log_datasets`: name, digest, source; context train / test);
- artifacts: `config.yaml`, the resolved config; `logs/`, the job's output (a local point's `point.log`, a
  SLURM task's `slurm-<job>.out/.err`: `attach_files`);
- random-init floors are runs of their own experiment `mimsweep-floors` (core/evaluation/floors.py).
A point's identity finds its runs again: FINISHED ones are skipped by the next launch, others resumed, and
finished pre-trainings are found in the whole store (sweeps/plan.py decide).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from core.config import REPO, science_params, to_yaml

TAG = "mimsweep."
FINISHED = "FINISHED"
KIND = "custom_model_development"   # the value of `mlflow.experimentKind` for which the UI shows runs
OPERATIONAL_TAGS = ("cluster.backend", "cluster.gpus_per_task", "cluster.eval.gpus_per_task")


def describe_experiment(c, exp_id: str, note: str) -> None:
    """The experiment's kind (set once: a user may change it in the UI) and its description (Markdown).
    Jobs starting together may write the same new tag at once: on a SQL store the loser's insert fails, and
    the tag is there all the same."""
    exp = c.get_experiment(exp_id)
    for key, value in (("mlflow.experimentKind", KIND), ("mlflow.note.content", note)):
        if key in exp.tags and (key == "mlflow.experimentKind" or exp.tags[key] == value):
            continue
        try:
            c.set_experiment_tag(exp_id, key, value)
        except Exception:  # noqa: BLE001 - a concurrent writer of the same tag (unique key): it exists now
            if key not in c.get_experiment(exp_id).tags:
                raise


@functools.lru_cache(maxsize=1)  # once per launch, not twice per point of a 1,000-point grid
def git_state() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _search_all(c, exp_ids: list[str], flt: str) -> list:
    """Every run of the experiments matching the filter, oldest first (paged)."""
    runs, token = [], None
    while exp_ids:
        page = c.search_runs(exp_ids, filter_string=flt, max_results=1000, page_token=token,
                             order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def point_runs(c, exp_id: str, sweep: str | None = None) -> list:
    """The point runs of an experiment (of one sweep), oldest first: one paged search."""
    flt = f"tags.`{TAG}sweep` = '{sweep}'" if sweep else ""
    return [r for r in _search_all(c, [exp_id], flt) if r.data.tags.get(TAG + "kind") == "point"]


def pretrainings(c, uses_teacher: Callable, write: bool = True, exp_ids: list[str] | None = None) -> list:
    """Every point run of the store (all experiments, or only `exp_ids`) that pre-trains itself, oldest first:
    the candidates a point of any sweep may reuse (core/tracking/identity.py). Runs that only evaluate
    another's checkpoint are left out. `uses_teacher(cfg)`: see migrate_legacy."""
    if exp_ids is None:
        exp_ids, token = [], None
        while True:
            page = c.search_experiments(max_results=1000, page_token=token)
            exp_ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                break
    runs = []
    for i in range(0, len(exp_ids), 100):
        runs += _search_all(c, exp_ids[i:i + 100], f"tags.`{TAG}pretrain_signature` LIKE '%'")
        runs += migrate_legacy(c, exp_ids[i:i + 100], uses_teacher, write)
    runs.sort(key=lambda r: r.info.start_time or 0)
    return [r for r in runs if r.data.tags.get(TAG + "kind") == "point" and not r.data.tags.get(TAG + "pretrained_by")]


def migrate_legacy(c, exp_ids: list[str], uses_teacher: Callable, write: bool = True) -> list:
    """The migration of FINISHED point runs tracked before core/tracking/identity.py (only `mimsweep.signature`):
    their pre-training and evaluation signatures, work folder and checkpoint are worked out from their own
    `config.yaml` artifact (the resolved config the old code stored) and written as the tags the current
    code sets (`write`; a dry run only adds them in memory), with `mimsweep.identity_migrated`. From then on
    they are pre-trainings like any other: a point whose evaluation changed evaluates their checkpoint
    instead of pre-training again. `uses_teacher(cfg)` says whether a config's method builds its teacher
    (core.methods.uses_teacher). Returns those runs."""
    import tempfile

    from omegaconf import OmegaConf

    from core.tracking import identity
    found = _search_all(c, exp_ids, f"tags.`{TAG}kind` = 'point' and attributes.status = 'FINISHED'")
    out, names = [], {}
    for r in found:
        tags = r.data.tags
        if tags.get(TAG + "pretrain_signature") or not tags.get(TAG + "signature") or tags.get(TAG + "pretrained_by"):
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = OmegaConf.create(Path(c.download_artifacts(r.info.run_id, "config.yaml", tmp)).read_text())
            if r.info.experiment_id not in names:
                names[r.info.experiment_id] = c.get_experiment(r.info.experiment_id).name
            workdir = (Path(cfg.output_root).resolve() / "runs" / names[r.info.experiment_id]
                       / f"{tags[TAG + 'signature']}-{r.info.run_id[:8]}")
            new = {TAG + "pretrain_signature": identity.pretrain_signature(cfg, uses_teacher(cfg)),
                   TAG + "eval_signature": identity.eval_signature(cfg), TAG + "workdir": str(workdir),
                   TAG + "identity_migrated": "from config.yaml"}
        except Exception as e:  # noqa: BLE001 - no config.yaml, a method this code lacks: leave it as it was
            print(f"note: run {r.info.run_id[:8]} (tracked by an older mimsweep) keeps its old identity: "
                  f"{type(e).__name__}: {str(e)[:120]}")
            continue
        if (workdir / "checkpoint.pt").is_file():
            new[TAG + "checkpoint"] = str(workdir / "checkpoint.pt")
        if write:
            for k, v in new.items():
                c.set_tag(r.info.run_id, k, v)
        r.data.tags.update(new)
        out.append(r)
    return out


def finished_checkpoint(run) -> str | None:
    """The absolute path of the run's finished pre-training checkpoint if the job recorded one and the file is
    still there, else None."""
    path = run.data.tags.get(TAG + "checkpoint")
    return path if path and Path(path).is_file() else None


def runs_by_signature(c, exp_id: str, sweep: str | None = None) -> dict:
    """{legacy signature: latest run} of an experiment (one paged search, not one call per point)."""
    runs = point_runs(c, exp_id, sweep)
    out = {}
    for r in runs:
        sig = r.data.tags.get(TAG + "signature")
        if sig and r.data.tags.get(TAG + "kind") == "point":
            out[sig] = r  # later runs overwrite earlier ones
    return out


def start_launch(c, exp_id: str, sweep: str, overrides: list[str], n_points: int, command: str = "") -> str:
    """The launch's parent run (RUNNING); `command`: the launch command, its description."""
    commit, dirty = git_state()
    tags = {TAG + "kind": "launch", TAG + "sweep": sweep, TAG + "overrides": json.dumps(overrides),
            TAG + "points": str(n_points), TAG + "git_commit": commit, TAG + "git_dirty": str(dirty),
            TAG + "host": socket.gethostname(), TAG + "pid": str(os.getpid()), "mlflow.source.git.commit": commit}
    if command:
        tags["mlflow.note.content"] = f"`{command}`"
    run = c.create_run(exp_id, run_name=f"{sweep} launch {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags)
    return run.info.run_id


def latest_launch(c, exp_id: str, sweep: str):
    """The latest launch run of a sweep in an experiment, or None."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TAG}kind` = 'launch' and tags.`{TAG}sweep` = '{sweep}'",
                         max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def close_orphaned_launches(c, exp_id: str) -> list[str]:
    """Launch runs left RUNNING by a launch process of this host that no longer exists (killed with -9, or
    it ended while the store was unreachable): marked FAILED with that reason. -> their ids."""
    host, closed = socket.gethostname(), []
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TAG}kind` = 'launch' and attributes.status = 'RUNNING'",
                         max_results=1000)
    for r in runs:
        tags = r.data.tags
        if tags.get(TAG + "host") != host or not tags.get(TAG + "pid", "").isdigit():
            continue
        try:
            os.kill(int(tags[TAG + "pid"]), 0)
            continue  # alive: a launch running now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        set_status(c, r.info.run_id, "FAILED", "its launch process ended without closing it (killed, or the "
                   "tracking store was unreachable when it ended); its points are resumed by later launches")
        closed.append(r.info.run_id)
    return closed


def operational_tags(cfg) -> dict:
    """The operational keys a reader of the runs needs (reports/build.py: devices per task), as tags: they are
    no params (see the module's docstring). Set at every launch of the run: a relaunch may change them."""
    from omegaconf import OmegaConf
    out = {}
    for key in OPERATIONAL_TAGS:
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None:
            out[TAG + key] = str(v)
    return out


def point_run(parent_id: str | None, sweep: str, label: str, overrides: list[str], sig: str, cfg,
              identity: dict | None = None, name: str | None = None, config_yaml: str | None = None,
              flat: dict | None = None) -> dict:
    """What a point's run holds when it is created: {"name", "tags", "params", "config"} (the resolved config
    as YAML, the `config.yaml` artifact; `config_yaml` if the caller has it). `sig`: the legacy signature (tag
    `signature`); `identity`: more tags (pretrain_signature, eval_signature, pretrained_by, ...); `name`:
    default `<label> seed=<seed>`; `flat`: core.config.flatten(cfg) if the caller has it."""

    commit, dirty = git_state()
    tags = {TAG + "kind": "point", TAG + "sweep": sweep, TAG + "label": label, TAG + "signature": sig,
            **{TAG + k: v for k, v in (identity or {}).items() if v is not None},
            TAG + "overrides": json.dumps(overrides), TAG + "git_commit": commit, TAG + "git_dirty": str(dirty),
            TAG + "host": socket.gethostname(), "mlflow.source.git.commit": commit, **operational_tags(cfg)}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in science_params(cfg, flat).items()}
    return {"name": name or f"{label} seed={cfg.seed}", "tags": tags, "params": params,
            "config": config_yaml if config_yaml is not None else to_yaml(cfg)}


def create_point_run(c, exp_id: str, parent_id: str | None, sweep: str, label: str, overrides: list[str],
                     sig: str, cfg, identity: dict | None = None, name: str | None = None) -> str:
    """A SCHEDULED child run holding the point's params, tags and resolved config (`point_run`), created
    through the client (any store). Many at once on a database store: `bulk.create_runs`."""
    from mlflow.entities import Param

    spec = point_run(parent_id, sweep, label, overrides, sig, cfg, identity, name)
    run = c.create_run(exp_id, run_name=spec["name"], tags=spec["tags"])
    rid = run.info.run_id
    params = [Param(k, v) for k, v in spec["params"].items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(rid, params=params[i:i + 100])
    c.log_text(rid, spec["config"], "config.yaml")
    set_status(c, rid, "SCHEDULED")
    return rid


STATUSES = ("SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED")


def set_status(c, run_id: str, status: str, reason: str | None = None) -> None:
    """The one place a run's status is written. FAILED/KILLED carry their reason in `mimsweep.failure`,
    FAILED counts itself in `mimsweep.failures`; FINISHED removes a failure tag an earlier attempt left (a run that finished is not marked failed)."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    if status == "FAILED":  # attempts: cluster.max_attempts failures and a launch no longer retries the point
        failures = int(c.get_run(run_id).data.tags.get(TAG + "failures", "0")) + 1
        c.set_tag(run_id, TAG + "failures", str(failures))
    if reason is not None:
        c.set_tag(run_id, TAG + "failure", reason[:5000])
    elif status == FINISHED and TAG + "failure" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, TAG + "failure")
    if status in ("SCHEDULED", "RUNNING"):
        c.update_run(run_id, status=status)
    else:
        c.set_terminated(run_id, status)


def logged_at(c, run_id: str, keys: list[str], step: int) -> set[str]:
    """Those of `keys` the run already holds at `step`."""
    return {k for k in keys if any(m.step == step for m in c.get_metric_history(run_id, k))}




def attach_files(c, run_id: str, files: dict, folder: str) -> list[str]:
    """Upload {artifact name: local path} into the run's artifact `folder` (files that exist; a file uploaded
    before is replaced by its longer self). Best effort: what could not be sent is named in the result
    (-> the names sent), never raised, so a log never fails the run it belongs to."""
    import shutil
    import tempfile
    sent = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files.items():
            if not Path(path).is_file():
                continue
            try:
                shutil.copyfile(path, Path(tmp) / name)   # a snapshot: the job may still be writing the file
                c.log_artifact(run_id, str(Path(tmp) / name), folder)
                sent.append(name)
            except Exception as e:  # noqa: BLE001
                print(f"[mimsweep] could not attach {path} to run {run_id[:8]}: {type(e).__name__}: {str(e)[:160]}",
                      flush=True)
    return sent


def log_datasets(c, run_id: str, datasets: list[dict]) -> None:
    """The data a run read, as MLflow dataset inputs: each {name, digest, source, context, profile}
    (core/training/data.py `describe`). The store keeps one input per (name, digest) and run, so a resumed
    job that logs them again adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                   source=json.dumps({"uri": d["source"]}), profile=json.dumps(d.get("profile", {}))),
                           tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
    if not inputs:
        return
    try:
        c.log_inputs(run_id, datasets=inputs)
    except Exception:  # noqa: BLE001 - another run logged the same new dataset at the same moment (a unique
        time.sleep(0.5)  # key of the SQL store): it exists now, and this second call links it to the run
        c.log_inputs(run_id, datasets=inputs)
