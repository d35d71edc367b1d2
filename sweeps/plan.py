"""The planner of a sweep launch: grid points -> composed + validated configs -> signatures -> decisions.

    sweep spec -> points (sweeps/grid.py) -> each composed with the user's overrides and validated
    (core/config.py) -> its signature -> skip / resume / new / queued against what the tracker holds

Nothing here writes anything: cluster/launch.py runs a plan (creates runs, hands points to a backend),
reports/build.py and cluster/status.py use the same plan to find the runs of a launch.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from core import tracking
from core.config import SEARCHPATH, ConfigError, signature, validate
from sweeps.grid import Point, expand


@dataclass
class Planned:
    point: Point
    cfg: DictConfig
    signature: str
    action: str = "new"          # new | resume | skip | queued | failed (gave up: cluster.max_attempts)
    run_id: str | None = None
    status: str | None = None    # status of the existing run, if any
    slurm_jobs: tuple = ()       # SLURM array tasks recorded on the existing run

    failures: int = 0            # times the existing run ended FAILED

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
    seeds = cfg.sweep.get("seeds")
    if seeds is not None:
        seeds = list(seeds) if OmegaConf.is_list(seeds) else seeds
        ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                       for s in seeds)
        if not ok:
            raise ConfigError("sweep.seeds", seeds, "must be a non-empty list of integers >= 0",
                              "For example sweep.seeds=[0] or sweep.seeds=[0,1,2].")
    return cfg.sweep.name, expand(cfg.sweep)


SPEC_KEYS = ("name", "title", "fixed", "grid", "points", "seeds", "report")  # what a sweep file may hold


def check_swept(cfg: DictConfig, name: str, points: list[Point], base: list[str]) -> None:
    """A user override of a key the sweep itself sets would be silently replaced by the sweep's value:
    refused, with how to change the sweep instead."""
    if cfg.get("sweep") is None:
        return
    fixed = {override_key(o) for o in cfg.sweep.get("fixed") or []}
    grid = set(cfg.sweep.get("grid") or {})
    set_by_points = {override_key(o) for p in points for o in p.overrides}
    for o in base:
        key, value = override_key(o), o.partition("=")[2]
        if key not in set_by_points:
            continue
        if key == "seed":
            raise ConfigError(key, value, f"the sweep {name} sets it for each point", "Give the seeds as "
                              f"sweep.seeds=[{value}] (or a list, e.g. sweep.seeds=[0,1,2]).")
        if key in grid:
            raise ConfigError(key, value, f"the sweep {name} sweeps this key (grid values {list(cfg.sweep.grid[key])}) "
                              "and its grid would replace this override", f"To change the grid: "
                              f"'sweep.grid={{{key}:[{value}]}}' (a list of values), or a new file in sweeps/conf/sweep/.")
        if key in fixed:
            raise ConfigError(key, value, f"the sweep {name} fixes this key (fixed: {list(cfg.sweep.fixed)}) "
                              "and would replace this override", "Change the sweep's fixed overrides "
                              "(sweep.fixed=[...]) or write a new file in sweeps/conf/sweep/.")
        raise ConfigError(key, value, f"the points of sweep {name} set this key and would replace this override",
                          "Change the points (sweep.points=[...]) or write a new file in sweeps/conf/sweep/.")


def check_added_keys(task_overrides: list[str], base: list[str], point: Point, cache: dict) -> None:
    """`+key=value` adds a key no config file has, so nothing reads it (Hydra itself suggests `+` after a
    typo): refused with a did-you-mean, unless the point's config has the key anyway or it is a part of a
    sweep spec (`+sweep.points=[...]`)."""
    from core.config import flatten, unknown_key
    groups = _config_groups()
    for o in task_overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key, value = override_key(o), o.partition("=")[2]
        parts = key.split(".")
        if key in groups or parts[0] == "hydra":
            continue
        if parts[0] == "sweep":
            if len(parts) == 2 and parts[1] in SPEC_KEYS:
                continue
            raise ConfigError(key, value, "is not a key of a sweep spec (those are " + ", ".join(SPEC_KEYS) + ")")
        ref = compose_point([x for x in base if x != o], point, cache)
        known = list(flatten(ref))
        if key in known:
            continue
        raise unknown_key(key, value, known)


def plan(cfg: DictConfig, task_overrides: list[str]) -> tuple[str, list[Planned]]:
    name, points = sweep_points(cfg)
    base = user_overrides(task_overrides)
    check_swept(cfg, name, points, base)
    planned, cache = [], {}
    check_added_keys(task_overrides, base, points[0], cache)
    for p in points:
        try:
            pc = compose_point(base, p, cache)
            validate(pc)
        except ConfigError as e:
            raise ConfigError(e.key, e.value, str(e).split(": ", 1)[1].rstrip("."),
                              f"(sweep {name}, point '{p.label}', seed {p.seed})") from None
        sig = signature(pc)
        if pc.tracking.get("uri"):  # params, config.yaml and manifests never hold a password
            pc.tracking.uri = tracking.redact(pc.tracking.uri)
        planned.append(Planned(p, pc, sig))
    return name, planned


def decide(planned: list[Planned], existing: dict) -> None:
    """FINISHED -> skip; FAILED cluster.max_attempts times -> failed (not run unless retry_failed=true);
    any other existing run of the signature -> resume into it; none -> new."""
    for pl in planned:
        run = existing.get(pl.signature)
        if run is None:
            continue
        pl.run_id, pl.status = run.info.run_id, run.info.status
        pl.failures = int(run.data.tags.get(tracking.TAG + "failures", "0"))
        pl.action = "skip" if run.info.status == tracking.FINISHED else "resume"
        if (pl.action == "resume" and run.info.status == "FAILED" and not pl.cfg.get("retry_failed")
                and pl.failures >= pl.cfg.cluster.get("max_attempts", 3)):
            pl.action = "failed"
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
    print(f"sweep {name}: {len(planned)} point(s), tracking {tracking.redact(uri)}", file=file)
    for pl in planned:
        extra = f" ({pl.status.lower()} run {pl.run_id[:8]})" if pl.run_id else ""
        if pl.action == "failed":
            extra = f" (run {pl.run_id[:8]} failed {pl.failures} times; not run again: retry_failed=true retries it)"
        print(f"  {pl.action:6s} {pl.point.label:24s} seed={pl.point.seed} sig={pl.signature}{extra}", file=file)
