"""Plan a sweep launch against the tracker, then hand the runnable points to a backend.

    grid points -> composed + validated configs -> signatures -> skip / resume / new -> backend

Every point is composed and validated before anything is created or submitted, so a bad value stops
the launch with a message naming the key, with no half-launched sweep left behind.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core import tracking
from core.config import SEARCHPATH, ConfigError, signature, validate
from sweeps.grid import Point, expand


@dataclass
class Planned:
    point: Point
    cfg: DictConfig
    signature: str
    action: str = "new"          # new | resume | skip | queued
    run_id: str | None = None
    status: str | None = None    # status of the existing run, if any
    slurm_jobs: tuple = ()       # SLURM array tasks recorded on the existing run

    @property
    def workdir_name(self) -> str:
        return f"{self.signature}-{self.run_id[:8]}"


def override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Later lists win per key (the point's swept values beat the user's command line)."""
    merged: dict[str, str] = {}
    for lst in lists:
        for o in lst:
            merged.pop(override_key(o), None)
            merged[override_key(o)] = o
    return list(merged.values())


def user_overrides(task_overrides: list[str]) -> list[str]:
    """The command line minus what only selects or shapes the sweep itself."""
    return [o for o in task_overrides if not override_key(o).split(".")[0] == "sweep"]


def _config_groups() -> set[str]:
    from core.config import CONFIG_DIR
    return {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()} | {"cluster"}


def compose_point(base: list[str], point: Point, cache: dict | None = None) -> DictConfig:
    """The point's resolved config: Hydra composition of the user's overrides + the point's.

    A full Hydra compose costs ~0.2 s; a 1,000-point grid differs mostly in plain values (a mask ratio,
    a seed). So the composition is cached per set of *group* choices and shared overrides, and the point's
    own value overrides are applied to a copy with Hydra's own override machinery, then resolved.
    tests/test_config.py checks this gives exactly what a full compose gives for every shipped sweep.
    """
    from hydra import compose
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = merge_overrides(base, point.overrides)
    groups = _config_groups()
    own = {override_key(o) for o in point.overrides}
    shared = [o for o in merged if override_key(o) not in own or override_key(o) in groups]
    values = [o for o in merged if override_key(o) in own and override_key(o) not in groups]
    key = tuple(shared)
    if cache is None or key not in cache:
        composed = compose(config_name="config", overrides=[SEARCHPATH] + shared)
        if cache is None:
            cache = {}
        cache[key] = composed
    cfg = copy.deepcopy(cache[key])
    if values:
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), cfg)
    OmegaConf.resolve(cfg)
    return cfg


def sweep_points(cfg: DictConfig) -> tuple[str, list[Point]]:
    if cfg.get("sweep") is None:  # a single run of the composed config
        return "single", [Point("default", cfg.seed, [f"seed={cfg.seed}"])]
    return cfg.sweep.name, expand(cfg.sweep)


def plan(cfg: DictConfig, task_overrides: list[str]) -> tuple[str, list[Planned]]:
    name, points = sweep_points(cfg)
    base = user_overrides(task_overrides)
    planned, cache = [], {}
    for p in points:
        try:
            pc = compose_point(base, p, cache)
            validate(pc)
        except ConfigError as e:
            raise ConfigError(e.key, e.value, str(e).split(": ", 1)[1].rstrip("."),
                              f"(sweep {name}, point '{p.label}', seed {p.seed})") from None
        planned.append(Planned(p, pc, signature(pc)))
    return name, planned


def check_tracking(uri: str):
    c = tracking.client(uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise ConfigError("tracking.uri", uri, f"the MLflow store cannot be reached ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})", "Start the server or fix the URI; nothing was run.") from None
    return c


def decide(planned: list[Planned], existing: dict) -> None:
    """FINISHED -> skip; any other existing run of the signature -> resume into it; none -> new."""
    for pl in planned:
        run = existing.get(pl.signature)
        if run is None:
            continue
        pl.run_id, pl.status = run.info.run_id, run.info.status
        pl.action = "skip" if run.info.status == tracking.FINISHED else "resume"
        pl.slurm_jobs = tuple(v for k, v in run.data.tags.items() if k.startswith(tracking.TAG + "slurm_job_"))


def skip_queued(planned: list[Planned]) -> None:
    """Points whose SLURM task is still pending or running are left alone (one squeue/sacct call)."""
    from cluster.slurm import ACTIVE, queue_states
    jobs = [j for pl in planned if pl.action == "resume" for j in pl.slurm_jobs]
    states = queue_states(jobs)
    for pl in planned:
        live = [states[j] for j in pl.slurm_jobs if states.get(j) in ACTIVE]
        if pl.action == "resume" and live:
            pl.action, pl.status = "queued", live[0]


def print_plan(name: str, planned: list[Planned], uri: str, file=sys.stdout) -> None:
    print(f"sweep {name}: {len(planned)} point(s), tracking {uri}", file=file)
    for pl in planned:
        extra = f" ({pl.status.lower()} run {pl.run_id[:8]})" if pl.run_id else ""
        print(f"  {pl.action:6s} {pl.point.label:24s} seed={pl.point.seed} sig={pl.signature}{extra}", file=file)


def launch(cfg: DictConfig, task_overrides: list[str]) -> int:
    """Entry of `sweeps/run.py`. Returns the process exit code."""
    name, planned = plan(cfg, task_overrides)
    uri = tracking.resolve_uri(cfg.tracking.uri, cfg.output_root)
    c = check_tracking(uri)
    exp_name = cfg.tracking.experiment or (name if name != "single" else "mimsweep")
    exp_id = tracking.experiment_id(c, exp_name, uri)
    decide(planned, tracking.runs_by_signature(c, exp_id, name))
    backend = cfg.cluster.backend
    if backend == "slurm" and not cfg.dry_run:
        from cluster.slurm import preflight
        preflight(cfg.cluster)
        skip_queued(planned)
    if backend == "slurm" and uri.startswith("sqlite"):
        print("note: SLURM tasks will write to a SQLite file. That is fine on one machine; on a cluster's shared "
              "filesystem many writers corrupt it: use a tracking server (tracking.uri=http://HOST:5000).")
    print_plan(name, planned, uri)
    todo = [pl for pl in planned if pl.action in ("new", "resume")]
    root = Path(cfg.output_root).resolve() / "runs" / exp_name
    if cfg.dry_run:
        if backend == "slurm" and todo:
            from cluster.slurm import submit
            for pl in todo:
                pl.run_id = pl.run_id or "0" * 32
            arrays = submit(todo, cfg.cluster, uri, root, name, dry_run=True)
            for a in arrays:
                print(f"--- sbatch script ({a['phase']}, {a['tasks']} task(s)) ---\n{a['script']}")
            print(f"dry run: {len(arrays)} sbatch call(s) for {len(todo)} point(s); nothing was submitted.")
        else:
            print("dry run: nothing was started.")
        return 0
    if not todo:
        print("nothing to do: every point has a finished, queued or running run.")
        return 0
    parent = tracking.start_launch(c, exp_id, name, user_overrides(task_overrides), len(todo))
    for pl in todo:
        if pl.action == "new":
            pl.run_id = tracking.create_point_run(c, exp_id, parent, name, pl.point.label, pl.point.overrides,
                                                  pl.signature, pl.cfg)
    if backend == "slurm":
        return _submit_slurm(c, parent, todo, cfg, uri, root, name)
    if backend != "local":
        raise ConfigError("cluster.backend", backend, "must be local or slurm")
    from cluster.local import run_all
    failed = run_all(todo, uri, root)
    c.set_tag(parent, tracking.TAG + "summary", json.dumps({"ran": len(todo), "failed": failed,
                                                           "skipped": len(planned) - len(todo)}))
    c.set_terminated(parent, "FAILED" if failed else "FINISHED")
    return 1 if failed else 0


def _submit_slurm(c, parent: str, todo: list[Planned], cfg, uri: str, root: Path, name: str) -> int:
    from cluster.slurm import submit
    arrays = submit(todo, cfg.cluster, uri, root, name)
    chunk = arrays[0]["tasks"] if arrays else 0
    phases = 2 if cfg.cluster.separate_eval else 1
    for ai, a in enumerate(arrays):
        part = todo[(ai // phases) * chunk:(ai // phases) * chunk + a["tasks"]]
        for i, pl in enumerate(part):
            c.set_tag(pl.run_id, f"{tracking.TAG}slurm_job_{a['phase']}", f"{a['job_id']}_{i}")
    ids = [a["job_id"] for a in arrays]
    c.set_tag(parent, tracking.TAG + "slurm_arrays", ",".join(ids))
    c.set_terminated(parent, "FINISHED")  # the launch is done; the points report into their own runs
    print(f"queued {len(todo)} point(s) as {len(arrays)} array job(s): {', '.join(ids)}")
    print(f"follow them with: python cluster/status.py sweep={name}  (MLflow: {uri})")
    return 0
