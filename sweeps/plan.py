"""The planner of a sweep launch: grid points -> composed + validated configs -> signatures -> decisions.

    sweep spec -> points (sweeps/grid.py) -> each composed with the user's overrides and validated
    (core/config.py) -> its signature -> skip / resume / new / queued against what the tracker holds

Nothing here writes anything: cluster/launch.py runs a plan (creates runs, hands points to a backend),
reports/build.py and cluster/status.py use the same plan to find the runs of a launch.
"""
from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path
from dataclasses import dataclass, field

from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode

from core import config, tracking
from core import methods
from core.tracking import identity
from core.config import SEARCHPATH, ConfigError, flatten
from sweeps.grid import Point, expand, override_key


@dataclass
class Planned:
    point: Point
    cfg: DictConfig
    signature: str               # the pre-training signature (core/tracking/identity.py); names the work folder
    eval_sig: str = ""           # the evaluation signature
    legacy_sig: str = ""         # the whole-config signature of the code before core/tracking/identity.py
    action: str = "new"          # the point run: new | resume | skip | queued | failed (cluster.max_attempts)
    run_id: str | None = None
    status: str | None = None    # status of the existing run, if any
    slurm_jobs: tuple = ()       # SLURM array tasks recorded on the existing run
    pretrain: str = "new"        # new | resume | reuse (a finished one) | after (one that still runs) | done
    evaluate: str = "new"        # new | skip
    checkpoint: str | None = None     # reuse / after: the checkpoint file the evaluation reads
    pretrained_by: str | None = None  # reuse / after: the run that trains it
    after: object = None         # after: the Planned of this launch that pre-trains it, or a SLURM task "JOB_I"
    workdir: str | None = None   # an existing run's folder name, when it is not <signature>-<run> (old runs)

    failures: int = 0            # times the existing run ended FAILED
    estimate_s: float | None = None   # its time on this machine (cluster/estimate.py), once the launch estimated it
    job_estimate_s: float | None = None  # the same less its process's start-up: what its run's wall_s measures
    signatures: tuple = ()       # plan(check=False): the pre-training signature with and without the teacher
    uses_teacher: bool | None = None  # whether its method builds its teacher; plan(check=False): known once matched
    flat: dict | None = field(default=None, repr=False)  # core.config.flatten(cfg), as planned
    _yaml: str | None = field(default=None, repr=False)

    def config_yaml(self) -> str:
        """The resolved config as YAML (its run's `config.yaml`, its SLURM task's config), emitted once."""
        if self._yaml is None:
            from core.config import to_yaml
            self._yaml = to_yaml(self.cfg)
        return self._yaml

    @property
    def workdir_name(self) -> str:
        return self.workdir or f"{self.signature}-{self.run_id[:8]}"

    @property
    def phase(self) -> str:
        """What the point's job does: `evaluate` only (on another run's pre-training), or `all`."""
        return "evaluate" if self.pretrain in ("reuse", "after") else "all"

    def identity_tags(self, root) -> dict:
        """The run's identity tags (core/tracking/runs.py create_point_run); `root`: the experiment's run folder."""
        from pathlib import Path
        tags = {"pretrain_signature": self.signature, "eval_signature": self.eval_sig,
                "workdir": str(Path(root).resolve() / self.workdir_name)}
        if self.phase == "evaluate":
            tags.update(pretrained_by=self.pretrained_by, pretrained_checkpoint=self.checkpoint)
        return tags


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


def compose_point(base: list[str], point: Point, cache: dict | None = None, check: bool = False) -> DictConfig:
    """The point's resolved config: Hydra composition of the user's overrides + the point's.

    A full Hydra compose costs ~0.2 s; a 1,000-point grid differs mostly in plain values (a mask ratio,
    a seed). So the composition is cached per set of *group* choices, and every value override (the user's
    and the point's) is applied to a copy with Hydra's own override machinery, as Hydra applies them after
    the defaults, then resolved. `check`: before that, a value for a key that is true/false in the configs must
    be true or false (Hydra would take `data.hflip=maybe` as the string 'maybe', which every `if` reads as true).
    tests/test_config.py checks this gives exactly what a full compose gives for every shipped sweep.
    """
    from hydra import compose
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cache = {} if cache is None else cache
    merged = merge_overrides(base, point.overrides)
    groups = _config_groups()
    in_compose = lambda o: override_key(o) in groups or override_key(o).split(".")[0] == "hydra"  # noqa: E731
    choices = tuple(o for o in merged if in_compose(o))
    values = [o for o in merged if not in_compose(o)]
    if choices not in cache:  # kept pickled: a copy is one unpickling, ~4x faster than deepcopy of a DictConfig
        composed = compose(config_name="config", overrides=[SEARCHPATH, *choices])
        cache[choices] = pickle.dumps(composed, protocol=pickle.HIGHEST_PROTOCOL), _interpolations(composed)
    pickled, interpolations = cache[choices]
    cfg = pickle.loads(pickled)
    if values:
        parser, parsed_once = cache.setdefault("parser", OverridesParser.create()), cache.setdefault("parsed", {})
        for v in values:  # a grid repeats its values (10 mask ratios x 100 seeds): each string is parsed once
            if v not in parsed_once:
                parsed_once[v] = parser.parse_overrides([v])[0]
        parsed = [parsed_once[v] for v in values]
        if check:
            for o in parsed:
                default = OmegaConf.select(cfg, o.key_or_group, default=None, throw_on_missing=False)
                if isinstance(default, bool) and not isinstance(o.value(), bool) and not o.is_delete():
                    raise ConfigError(o.key_or_group, o.value(), "must be true or false")
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
    if any("${" in v for v in values):
        OmegaConf.resolve(cfg)
    else:  # what OmegaConf.resolve does, at the few interpolations only (it visits all ~160 nodes: 2 ms a point)
        for path, reference in interpolations:
            _resolve_at(cfg, path, reference)
    return cfg


def _interpolations(cfg) -> list[tuple]:
    """[(path, reference)] of the interpolations in a composed config: the path as keys and list indices, the
    reference the key of a plain `${a.b}` (None for anything else: a resolver, a relative key)."""
    found = []

    def walk(node, path):
        for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
            child = node._get_node(k)
            if child._is_interpolation():
                plain = re.fullmatch(r"\$\{([A-Za-z_]\w*(?:\.\w+)*)\}", str(child._value()))
                found.append(((*path, k), plain and plain.group(1)))
            elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
                walk(child, (*path, k))
    walk(cfg, ())
    return found


def _resolve_at(cfg, path: tuple, reference: str | None) -> None:
    """Resolve the interpolation at `path` in place, as OmegaConf.resolve does (a value override may have
    replaced it or its container: then there is nothing, or only plain values, left to resolve there). A plain
    reference to a plain value is looked up directly: OmegaConf would parse it with its grammar, ~0.3 ms."""
    from omegaconf._impl import _resolve_container_value
    parent = cfg
    for k in path[:-1]:
        parent = _child(parent, k)
    node = _child(parent, path[-1])
    if node is None:
        return
    if reference and node._is_interpolation() and str(node._value()) == f"${{{reference}}}":
        target = cfg
        for part in reference.split("."):
            target = _child(target, part)
        if isinstance(target, ValueNode) and not target._is_interpolation() and not target._is_missing():
            node._set_value(target._value())
            return
    _resolve_container_value(parent, path[-1])


def _child(node, key):
    """The node at `key` of a config node, or None where there is none (a deletion `~key` or a replaced
    container took it away; OmegaConf's struct mode would raise)."""
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing() and key in node:
        return node._get_node(key)
    if isinstance(node, ListConfig) and not node._is_none() and not node._is_missing() \
            and isinstance(key, int) and key < len(node):
        return node._get_node(key)
    return None


def check_command_line(task_overrides: list[str]) -> None:
    """Mistakes Hydra passes silently: a key given twice (the last one wins: `pretrain.max_steps=3
    pretrain.max_steps=5`, two options of one group `cluster=local cluster=slurm`), and `sweep.grid={}`,
    which Hydra merges into the sweep's grid, changing nothing."""
    seen: dict[str, str] = {}
    for o in task_overrides:
        key = override_key(o)
        if key.split(".")[0] == "hydra" or "=" not in o:
            continue
        if key in seen:
            raise ConfigError(key, o.partition("=")[2], f"the command line gives this key twice ({seen[key]} and {o}), "
                              "and only the last would count", "Give each key once.")
        seen[key] = o
    grid = seen.get("sweep.grid")
    if grid is not None and grid.partition("=")[2].replace(" ", "") in ("{}", "null"):
        raise ConfigError("sweep.grid", grid.partition("=")[2], "an empty grid is merged into the sweep's grid and "
                          "changes nothing", "Give the values to sweep: 'sweep.grid={KEY:[V1,V2]}'.")


def check_spec(spec, name: str) -> None:
    """The sweep spec's shape (a file in sweeps/conf/sweep/ or `sweep.*` overrides): ConfigError naming the key."""
    grid, points = spec.get("grid"), spec.get("points")
    if grid is not None and points is not None:
        raise ConfigError("sweep.points", "[...]", f"sweep {name} gives both `grid` and `points`", "Keep one of them.")
    if points is None:
        if not OmegaConf.is_dict(grid) or len(grid) == 0:
            raise ConfigError("sweep.grid", OmegaConf.to_container(grid) if OmegaConf.is_config(grid) else grid,
                              f"sweep {name} needs a grid of at least one key (or `points`)",
                              "e.g. grid: {method.mask_ratio: [0.6, 0.75]} in its file, or 'sweep.grid={KEY:[V1,V2]}'.")
        for key, values in grid.items():
            if not OmegaConf.is_list(values) or len(values) == 0:
                raise ConfigError(f"sweep.grid.{key}", OmegaConf.to_container(values) if OmegaConf.is_config(values)
                                  else values, f"sweep {name}: each grid key needs a non-empty list of values")
        return
    if not OmegaConf.is_list(points) or len(points) == 0:
        raise ConfigError("sweep.points", points if not OmegaConf.is_config(points) else OmegaConf.to_container(points),
                          f"sweep {name} needs a non-empty list of points", "Each: {label: NAME, overrides: [...]}.")
    for i, p in enumerate(points):
        if not OmegaConf.is_dict(p) or p.get("label") is None or not (p.get("overrides") is None
                                                                       or OmegaConf.is_list(p.overrides)):
            raise ConfigError(f"sweep.points[{i}]", OmegaConf.to_container(p) if OmegaConf.is_config(p) else p,
                              "must be {label: NAME, overrides: [KEY=VALUE, ...]}")


def sweep_points(cfg: DictConfig) -> tuple[str, list[Point]]:
    if cfg.get("sweep") is None:  # a single run of the composed config
        return "single", [Point("default", cfg.seed, [f"seed={cfg.seed}"])]
    check_spec(cfg.sweep, cfg.sweep.get("name"))
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
    from core.config import OPTIONAL_KEYS, unknown_key
    groups = _config_groups()
    for o in task_overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key, value = override_key(o), o.partition("=")[2]
        parts = key.split(".")
        if key in groups or parts[0] == "hydra" or key in OPTIONAL_KEYS:
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


def single_name(overrides: list[str]) -> str:
    """The run name of a launch without a sweep (e.g. each job of `-m`): its overrides that change the result
    (not where or how it runs, not the seed, which the run name adds), or "default"."""
    from core.config import RUN_ONLY
    said = [o for o in overrides if not any(override_key(o) == k or override_key(o).startswith(k + ".")
                                            for k in (*RUN_ONLY, "hydra", "seed"))]
    return ", ".join(said) or "default"


def plan(cfg: DictConfig, task_overrides: list[str], check: bool = True) -> tuple[str, list[Planned]]:
    """The sweep's points, composed, (checked,) with their signatures. `check=False` (cluster/status.py: the
    launch checked them) neither validates the points nor imports a method (and with it torch): the
    pre-training signature is then known in both forms, with and without the teacher's keys, and match()
    takes the one a run has (`signatures`)."""
    if check:
        from core.job import validate  # here: core.job imports torch, which status.py does without
    check_command_line(task_overrides)
    name, points = sweep_points(cfg)
    base = user_overrides(task_overrides)
    if name == "single":
        points[0].name = single_name(base)
    check_swept(cfg, name, points, base)
    planned, cache, valid = [], {}, set()
    check_added_keys(task_overrides, base, points[0], cache)
    for p in points:
        try:
            pc = compose_point(base, p, cache, check=check)
            flat = flatten(pc)  # once: the checks, the signatures, the run's params and the estimate's shape read it
            if check:  # a point that differs from a checked one only in its seed needs only its seed checked
                rest = json.dumps({k: v for k, v in flat.items() if k != "seed"}, sort_keys=True, default=str)
                if rest in valid:
                    config.check_number(pc, "seed", 0, integer=True)
                else:
                    validate(pc)
                    valid.add(rest)
        except ConfigError as e:
            raise ConfigError(e.key, e.value, str(e).split(": ", 1)[1].rstrip("."),
                              f"(sweep {name}, point '{p.label}', seed {p.seed})") from None
        if pc.tracking.get("uri"):  # params, config.yaml and manifests never hold a password
            pc.tracking.uri = flat["tracking.uri"] = tracking.redact(pc.tracking.uri)
        teacher = methods.uses_teacher(pc) if check else None
        if check:
            alternatives = (identity.pretrain_signature(pc, teacher, flat),)
        else:
            alternatives = (identity.pretrain_signature(pc, True, flat), identity.pretrain_signature(pc, False, flat))
        planned.append(Planned(p, pc, alternatives[0], identity.eval_signature(pc, flat),
                               identity.legacy_signature(pc, flat), signatures=alternatives, flat=flat,
                               uses_teacher=teacher))
    return name, planned


def matchable(planned: list[Planned]):
    """match()'s rule as a test of a run's tags: whether the run can be the point run of one of `planned` (a
    report reads the params and metrics of those only: core/tracking/bulk.py runs(detail=))."""
    pairs = {(sig, pl.eval_sig) for pl in planned for sig in (pl.signatures or (pl.signature,))}
    legacy = {pl.legacy_sig for pl in planned}
    t = tracking.TAG

    def can(tags: dict) -> bool:
        if tags.get(t + "pretrain_signature"):
            return (tags[t + "pretrain_signature"], tags.get(t + "eval_signature")) in pairs
        return tags.get(t + "signature") in legacy
    return can


def match(planned: list[Planned], runs: list) -> dict:
    """{id(planned): its point run} among `runs` (oldest first; the latest wins): same (pre-training,
    evaluation) signatures, or, for a run tracked before core/tracking/identity.py (no pretrain_signature tag), the same
    legacy signature (the compatibility rule)."""
    pairs, legacy = {}, {}
    for r in runs:
        t = r.data.tags
        if t.get(tracking.TAG + "kind") != "point":
            continue
        if t.get(tracking.TAG + "pretrain_signature"):
            pairs[(t[tracking.TAG + "pretrain_signature"], t.get(tracking.TAG + "eval_signature"))] = r
        elif t.get(tracking.TAG + "signature"):
            legacy[t[tracking.TAG + "signature"]] = r
    out = {}
    for pl in planned:
        for sig in pl.signatures or (pl.signature,):
            run = pairs.get((sig, pl.eval_sig))
            if run is not None:
                pl.signature = sig
                if len(set(pl.signatures)) == 2:  # the launch signed it with the teacher's keys or without
                    pl.uses_teacher = sig == pl.signatures[0]
                break
        run = run or legacy.get(pl.legacy_sig)
        if run is not None:
            out[id(pl)] = run
    return out


def decide(planned: list[Planned], runs: list, trained: list = ()) -> None:
    """The rules of core/tracking/identity.py. `runs`: the sweep's point runs; `trained`: the store's runs that
    pre-train themselves (core.tracking.pretrainings), where finished pre-trainings are looked up.

    The point run: FINISHED -> skip; FAILED cluster.max_attempts times -> failed (not run unless
    retry_failed=true); any other -> resume into it; none -> new. Its pre-training: a finished
    one of the same pre-training signature anywhere in the store -> reuse (evaluate only); else the first
    point of this plan that pre-trains that signature does it (resume if its own run has a checkpoint) and the
    others evaluate after it; else new."""
    found = match(planned, runs)
    finished = {}
    for r in trained:  # oldest first: the latest finished one wins
        if tracking.finished_checkpoint(r):
            finished[r.data.tags[tracking.TAG + "pretrain_signature"]] = r
    trainers: dict[str, Planned] = {}
    for pl in planned:  # 1: existing runs; a run that pre-trains itself keeps doing so
        run = found.get(id(pl))
        if run is None:
            continue
        tags = run.data.tags
        pl.run_id, pl.status = run.info.run_id, run.info.status
        pl.slurm_jobs = tuple(v for k, v in tags.items() if k.startswith(tracking.TAG + "slurm_job_"))
        if tags.get(tracking.TAG + "workdir"):
            pl.workdir = Path(tags[tracking.TAG + "workdir"]).name
        elif tracking.TAG + "pretrain_signature" not in tags:  # an old run: its folder used the legacy signature
            pl.workdir = f"{tags.get(tracking.TAG + 'signature')}-{pl.run_id[:8]}"
        if run.info.status == tracking.FINISHED:
            pl.action, pl.pretrain, pl.evaluate = "skip", "done", "skip"
            continue
        pl.action = "resume"
        pl.failures = int(tags.get(tracking.TAG + "failures", "0"))
        if (run.info.status == "FAILED" and not pl.cfg.get("retry_failed")
                and pl.failures >= pl.cfg.cluster.get("max_attempts", 3)):
            pl.action = "failed"  # gave up: not run, not a trainer others wait for
            continue
        if not tags.get(tracking.TAG + "pretrained_by"):
            pl.pretrain = "resume"
            trainers.setdefault(pl.signature, pl)
    for pl in planned:  # 2: who pre-trains the others
        if pl.action in ("skip", "failed") or pl.pretrain == "resume":
            continue
        done = finished.get(pl.signature)
        if done is not None:
            pl.pretrain, pl.pretrained_by = "reuse", done.info.run_id
            pl.checkpoint = tracking.finished_checkpoint(done)
        elif pl.signature in trainers:
            pl.pretrain, pl.after = "after", trainers[pl.signature]
        else:
            pl.pretrain = "new"
            trainers[pl.signature] = pl


def resolve_after(planned: list[Planned], root) -> None:
    """Once the runs exist: the checkpoint an `after` point evaluates is its trainer's (in this launch)."""
    from pathlib import Path
    for pl in planned:
        if pl.pretrain == "after" and isinstance(pl.after, Planned):
            pl.pretrained_by = pl.after.run_id
            pl.checkpoint = str(Path(root).resolve() / pl.after.workdir_name / "checkpoint.pt")


def skip_queued(planned: list[Planned], trained: list, live_jobs) -> None:
    """For a backend with a queue (SLURM): points whose task is still pending or running are left alone, and
    a pre-training that a task of an earlier launch (any sweep) is still running is waited for, not repeated:
    the points that would pre-train it evaluate after that task instead. `live_jobs(job ids)` is the
    backend's answer (cluster/backend.py): {job id: state} of those still queued or running, in one call."""
    live_runs = [r for r in trained if r.info.status in ("SCHEDULED", "RUNNING")
                 and not tracking.finished_checkpoint(r) and r.data.tags.get(tracking.TAG + "workdir")]
    task_of = lambda r: next((v for k, v in r.data.tags.items()  # noqa: E731
                              if k in (tracking.TAG + "slurm_job_all", tracking.TAG + "slurm_job_pretrain")), None)
    jobs = [j for pl in planned if pl.action == "resume" for j in pl.slurm_jobs]
    jobs += [task_of(r) for r in live_runs if task_of(r)]
    states = live_jobs(jobs)
    for pl in planned:
        live = [states[j] for j in pl.slurm_jobs if j in states]
        if pl.action == "resume" and live:
            pl.action, pl.status = "queued", live[0]
    for pl in planned:  # a trainer of this plan whose own task still runs: the others wait for that task
        t = pl.after
        if pl.pretrain == "after" and isinstance(t, Planned) and t.action == "queued":
            pl.after = next((j for j in t.slurm_jobs if j in states), None)
    running = {}  # pre-training signature -> (run, its live task)
    for r in live_runs:
        if task_of(r) in states:
            running[r.data.tags[tracking.TAG + "pretrain_signature"]] = (r, task_of(r))
    for pl in planned:
        trainer = pl.after if isinstance(pl.after, Planned) else pl
        if pl.action in ("skip", "queued") or pl.pretrain not in ("new", "after") or trainer.pretrain != "new":
            continue
        if trainer.signature in running and trainer.run_id is None:
            run, task = running[trainer.signature]
            pl.pretrain, pl.after, pl.pretrained_by = "after", task, run.info.run_id
            pl.checkpoint = str(Path(run.data.tags[tracking.TAG + "workdir"]) / "checkpoint.pt")


def print_plan(name: str, planned: list[Planned], uri: str, file=sys.stdout) -> None:
    """One line per point: what happens to its run, its pre-training and its evaluation."""
    print(f"sweep {name}: {len(planned)} point(s), tracking {tracking.redact(uri)}", file=file)
    for pl in planned:
        extra = f" ({pl.status.lower()} run {pl.run_id[:8]})" if pl.run_id else ""
        if pl.pretrain == "reuse":
            pre = f"reuse (run {pl.pretrained_by[:8]})"
        elif pl.pretrain == "after":
            by = pl.after.point.label if isinstance(pl.after, Planned) else f"task {pl.after}"
            pre = f"after {by}" + (f" (run {pl.pretrained_by[:8]})" if pl.pretrained_by else "")
        else:
            pre = pl.pretrain
        if pl.action == "failed":
            extra = f" (run {pl.run_id[:8]} failed {pl.failures} times; not run again: retry_failed=true retries it)"
        est = f", ~{pl.estimate_s:.0f} s" if pl.estimate_s else ""
        print(f"  {pl.action:6s} {pl.point.label:24s} seed={pl.point.seed} sig={pl.signature} "
              f"pretrain {pre}, evaluate {pl.evaluate}{est}{extra}", file=file)
