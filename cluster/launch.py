"""Run a sweep's plan (sweeps/plan.py): create its runs, hand the runnable points to a backend.

    grid points -> composed + validated configs -> signatures -> skip / resume / new -> backend

Every point is composed and validated before anything is created or submitted, so a bad value stops
the launch with a message naming the key, with no half-launched sweep left behind. In order:

1. compose + validate every point (core/config.py), then the keys that say where and how points run
   (cluster/checks.py: the `cluster` group, output_root, names, no control characters anywhere);
2. read the store (never create it here), decide skip / resume / new;
3. SLURM: tools, controller, partition and its nodes, queue, and `sbatch --test-only` of the real script;
   then each point's time on this machine and the sweep's (cluster/estimate.py), printed with the plan;
4. dry run: print and stop (nothing written: no database, experiment or folder);
5. create the experiment (create-or-get), the launch run and the point runs, then run or submit. A
   failure from here on marks the launch run and every point run it did not hand over FAILED, with the
   reason in `mimsweep.failure`: a launch that ended leaves nothing SCHEDULED or RUNNING behind.
"""
from __future__ import annotations

import functools
import shlex
import signal
import sys
import threading
from pathlib import Path

from omegaconf import DictConfig

from cluster import checks, estimate
from cluster.backend import Backend
from core import methods, tracking
from core.config import ConfigError
from sweeps.plan import Planned, decide, plan, print_plan, resolve_after, user_overrides


class LaunchError(RuntimeError):
    """A launch that failed after it created runs (those are marked FAILED); the message says what happened."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a launch: its runs are marked KILLED, the message says so."""


def _terminated(signum, _frame):
    raise Interrupted(f"signal {signal.Signals(signum).name}")


def check_tracking(uri: str, create: bool = True, shown: str | None = None):
    """A client of the store, or None when a SQLite store does not exist and `create` is False.
    `shown`: the URI as the user gave it, for the message (redacted here)."""
    try:
        return tracking.open_store(uri, create)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        msg = tracking.redact_text(str(e).splitlines()[0][:200] if str(e) else "", uri)
        raise ConfigError("tracking.uri", tracking.redact(shown or uri), f"the MLflow store cannot be reached "
                          f"({type(e).__name__}: {msg})", "Start the server or fix the URI; nothing was run.") from None


PATIENCE_S = 600  # how long a launch retries a store that answers with a transient failure


class Patient:
    """The launch's MLflow client: a call that meets a transient failure (a server's 5xx or dropped connection,
    SQLite's "database is locked" past its busy timeout when many launches write at once) is retried for up
    to PATIENCE_S (core.tracking.patiently) instead of failing the launch and its points."""

    def __init__(self, c, wait_s: float = PATIENCE_S):
        self._c, self._wait_s = c, wait_s

    def call(self, fn, *args, what: str = ""):
        """fn(*args), a function that writes through this client (core/tracking/bulk.py), retried as its calls are."""
        return tracking.patiently(fn, *args, wait_s=self._wait_s, what=what)

    def within(self, wait_s: float) -> "Patient":
        """The same client, retrying for at most wait_s (a store already known to be down is not waited
        PATIENCE_S for at every call)."""
        return Patient(self._c, wait_s)

    def __getattr__(self, name):
        attr = getattr(self._c, name)
        if not callable(attr):
            return attr
        return functools.partial(tracking.patiently, attr, wait_s=self._wait_s, what=f"the launch's {name}")


def launch(cfg: DictConfig, task_overrides: list[str]) -> int:
    """Entry of `sweeps/run.py`. Returns the process exit code."""
    name, planned = plan(cfg, task_overrides)
    checks.validate(cfg, name)                         # before the store is touched
    raw_uri = tracking.resolve_uri(cfg.tracking.uri, cfg.output_root)
    uri = tracking.use_credentials(raw_uri)            # from here on: no password in the URI
    shown = tracking.redact(raw_uri)
    overrides = [tracking.redact_text(o, raw_uri) for o in user_overrides(task_overrides)]
    exp_name = cfg.tracking.experiment or (name if name != "single" else "mimsweep")
    backend = cfg.cluster.backend
    if backend not in checks.BACKENDS:  # checks.validate said so already; never fall through to running locally
        raise ConfigError("cluster.backend", backend, "must be one of " + ", ".join(checks.BACKENDS))
    root = Path(cfg.output_root).resolve() / "runs" / exp_name

    memory, where = _memory(cfg)
    for pl in planned:
        checks.model_fits(pl.cfg, [*task_overrides, *pl.point.overrides], memory, where)
    checks.output_folder(cfg.output_root)                            # read only, as everything up to step 5
    checks.tracking_uri(uri, shown)
    c = check_tracking(uri, create=False, shown=raw_uri)            # read only: a dry run must create nothing
    c = Patient(c) if c is not None else None
    exp_id = tracking.find_experiment(c, exp_name)
    # finished pre-trainings: the whole store or this experiment, per `reuse` (runs of older versions migrated
    # once; a dry run writes nothing)
    trained = []
    if c is not None and (cfg.reuse == "store" or (cfg.reuse == "experiment" and exp_id)):
        trained = tracking.pretrainings(c, methods.uses_teacher, write=not cfg.dry_run, exp_ids=None if cfg.reuse == "store" else [exp_id])
    decide(planned, tracking.point_runs(c, exp_id, name) if exp_id else [], trained)
    todo = _todo(planned)
    # every point to pre-train holds one checkpoint, one more is being written at a time, + 64 MiB (store, logs)
    sizes = [checks.checkpoint_bytes(pl.cfg) for pl in todo if pl.phase == "all"]
    checks.output_folder(cfg.output_root, sum(sizes) + max(sizes, default=0) + 64 * 2 ** 20 if todo else None)
    runner = backend_for(cfg, uri, root, name, task_overrides, raw_uri)
    todo = runner.prepare(planned, todo, trained)          # read only: scheduler checks, final list
    slots, threads = _parallelism(cfg, len(todo))
    _, total, note = estimate.estimate(cfg, todo, slots, threads, _floors_in(c, exp_id))
    runner.estimate_s = total or None
    print_plan(name, planned, shown)
    if note:
        print(note)
    if cfg.dry_run:
        print(runner.describe(todo))
        return 0
    given_up = [pl for pl in planned if pl.action == "failed"]
    if given_up:
        print(f"{len(given_up)} point(s) failed cluster.max_attempts times and are not run again; see why with "
              "`python cluster/status.py` (same overrides), fix it, then relaunch with retry_failed=true.")
    if exp_id:  # launch runs a killed launch left open (also one killed after its last point ended)
        tracking.close_orphaned_launches(c, exp_id)
    if not todo:
        print("nothing to do: every point has a finished, queued or running run" + (" or gave up." if given_up else "."))
        return 1 if given_up else 0

    c = Patient(check_tracking(uri, create=True, shown=raw_uri))
    exp_id = tracking.experiment_id(c, exp_name, uri)
    command = " ".join(["python sweeps/run.py", *(shlex.quote(tracking.redact_text(o, raw_uri))
                                                  for o in task_overrides if not o.startswith("hydra"))])
    tracking.describe_experiment(c, exp_id, experiment_note(cfg, name, command))
    parent, handed_over = None, set()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None  # SIGTERM ends runs as Ctrl-C does
    try:
        parent = tracking.start_launch(c, exp_id, name, overrides, len(todo), command)

        def open_run(pl: Planned) -> str:
            """The point's run, created now if new (its start time is now), with this launch's tags."""
            if pl.action == "new" and pl.run_id is None:
                pl.run_id = tracking.create_point_run(c, exp_id, parent, name, pl.point.label,
                                                      [tracking.redact_text(o, raw_uri) for o in pl.point.overrides],
                                                      pl.legacy_sig, pl.cfg, name=pl.point.run_name)
            if not (isinstance(pl.after, Planned) and pl.after.run_id is None):  # its trainer's run exists
                resolve_after([pl], root)
            _tag_identity(c, pl, root)  # core/tracking/identity.py; old runs resumed here get them too
            return pl.run_id

        runner.open_run = open_run
        if not runner.opens_runs_at_start:  # e.g. SLURM: the queue outlives the launch, so its runs exist now
            created = _create_in_bulk(c, exp_id, parent, name, todo, root, raw_uri)
            for pl in todo:
                if id(pl) not in created:
                    open_run(pl)
        print(f"MLflow: {tracking.ui_link(raw_uri, exp_id)}", flush=True)
        code = runner.start(c, parent, todo, handed_over, skipped=len(planned) - len(todo))
        return 1 if code or given_up else code
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        reason = (f"interrupted by {e.args[0] if e.args else 'Ctrl-C (SIGINT)'}" if interrupted
                  else tracking.redact_text(f"{type(e).__name__}: {e}", raw_uri))
        left = [pl.run_id for pl in todo if pl.run_id and pl.run_id not in handed_over]
        marked = _end_runs(c, parent, left, reason, "KILLED" if interrupted else "FAILED")
        if interrupted:
            raise Interrupted(f"{reason}: the launch run{' ' + parent[:8] if parent else ''} and the point runs it "
                              f"held are marked KILLED (reason in the tag {tracking.TAG}failure); relaunch to resume "
                              "them.") from None
        if not marked:
            raise LaunchError(f"the launch failed: {reason}. The tracking store did not answer, so its runs could "
                              "not be marked; relaunch when it answers again: finished points are skipped, the "
                              "others resume from their checkpoints, and this launch's run is closed.") from None
        raise LaunchError(f"the launch failed after creating its MLflow runs: {reason}. The launch run"
                          f"{' ' + parent[:8] if parent else ''} and {len(left)} point run(s) not handed to a job are "
                          f"marked FAILED (reason in the tag {tracking.TAG}failure); relaunch to retry them.") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _parallelism(cfg, n: int) -> tuple[int, int]:
    """(points at once, threads each): cluster.workers here (cluster/local.py), the array's throttle on SLURM."""
    if cfg.cluster.backend == "slurm":
        return max(1, min(int(cfg.cluster.array_parallelism), n)), int(cfg.cluster.cpus_per_task)
    from cluster.local import workers_for
    from core.config import cpu_count
    w = workers_for(cfg, max(n, 1))
    return w, max(1, cpu_count() // w)


def _floors_in(c, exp_id):
    """cfg -> whether the experiment holds a finished random-init floor of that seed, model and data
    (core/evaluation/floors.py: the point reuses it instead of computing it)."""
    found = set()
    if c is not None and exp_id:
        for r in c.search_runs([exp_id], f"tags.`{tracking.TAG}kind` = 'floor' and attributes.status = 'FINISHED'",
                               max_results=1000):
            p = r.data.params
            found.add((p.get("seed"), p.get("model.name"), p.get("data.name")))
    return lambda cfg: (str(cfg.seed), str(cfg.model.name), str(cfg.data.name)) in found


def _memory(cfg) -> tuple[int, str]:
    """(bytes, where in words) of the memory a point of this launch trains in: this machine's RAM (its GPU's on
    CUDA) for a local launch, the largest node of the partition for SLURM."""
    import os
    import shutil
    if cfg.cluster.backend == "slurm":
        from cluster.slurm import partitions
        nodes = partitions() if shutil.which("sinfo") else {}
        part = cfg.cluster.partition or next((p for p, n in nodes.items() if n["default"]), None)
        if part in nodes and nodes[part]["mem_mb"]:
            return nodes[part]["mem_mb"] * 2 ** 20, f"the memory of the largest node of partition {part}"
        return 2 ** 62, "the nodes' memory"
    from core.config import on_cuda
    if on_cuda(cfg):
        import torch
        return torch.cuda.get_device_properties(0).total_memory, "this machine's GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def experiment_note(cfg, sweep: str, command: str) -> str:
    """The experiment's description (MLflow shows it above its runs): what the sweep is, the paper table it
    rebuilds, the latest launch command and the report's."""
    from omegaconf import OmegaConf
    spec = OmegaConf.to_container(cfg.sweep, resolve=True) if cfg.get("sweep") is not None else {}
    lines = [f"**{spec.get('title') or sweep}** (sweep `{sweep}`)" if spec else
             "**Single runs** of `python sweeps/run.py` (no sweep; each run is named by its overrides)"]
    source = ((spec.get("report") or {}).get("reference") or {}).get("source")
    if source:
        lines.append(f"Rebuilds: {source}.")
    lines.append(f"Latest launch: `{command}`")
    if spec:
        lines.append(f"Report: `{command.replace('sweeps/run.py', 'reports/build.py', 1)}` (its files are attached "
                     "to the latest launch run, folder `report/`).")
    lines.append("One run per point (named for it), nested under the launch run that started it; its queue wait "
                 "is the metric `queue_s`. Random-init floors: experiment `mimsweep-floors` (on each point as "
                 "`floor_<metric>`). The resolved config, operational keys included, is each run's `config.yaml`; "
                 "its output is under `logs/`.")
    return "\n\n".join(lines)


def _todo(planned: list[Planned]) -> list[Planned]:
    """The points to run, those that pre-train first (a local launch evaluates the others after them)."""
    return sorted((pl for pl in planned if pl.action in ("new", "resume")), key=lambda pl: pl.pretrain == "after")


def _create_in_bulk(c, exp_id: str, parent: str, sweep: str, todo: list, root: Path, raw_uri: str) -> set:
    """The new points' runs, with their identity tags, in one transaction on a database store
    (core/tracking/bulk.py; a 1,000-point launch wrote ~5,000 transactions otherwise). -> id() of the
    points created; none on any other store (open_run creates them one by one)."""
    import uuid
    new = [pl for pl in todo if pl.action == "new" and pl.run_id is None]
    if not new or not tracking.bulk.writes_in_bulk(c):
        return set()
    for pl in new:
        pl.run_id = uuid.uuid4().hex             # known before the rows are written: `after` points name it
    resolve_after(todo, root)
    runs = []
    for pl in new:
        spec = tracking.point_run(parent, sweep, pl.point.label,
                                  [tracking.redact_text(o, raw_uri) for o in pl.point.overrides], pl.legacy_sig,
                                  pl.cfg, identity=_identity(pl, root), name=pl.point.run_name,
                                  config_yaml=pl.config_yaml(), flat=pl.flat)
        runs.append({**spec, "run_id": pl.run_id, "status": "SCHEDULED"})
    try:
        c.call(tracking.bulk.create_runs, c, exp_id, runs, what="the points' runs")
    except BaseException:
        for pl in new:                           # nothing was written: no run ids to end
            pl.run_id = None
        raise
    return {id(pl) for pl in new}


def _identity(pl: Planned, root: Path) -> dict:
    """The identity tags of a point's run (without the `mimsweep.` prefix): sweeps/plan.py identity_tags, and
    the job's estimate (cluster/status.py shows it beside the point's wall_s: its job, without start-up)."""
    tags = pl.identity_tags(root)
    if pl.job_estimate_s:
        tags["estimate_s"] = f"{pl.job_estimate_s:.0f}"
    return tags


def _tag_identity(c, pl: Planned, root: Path) -> None:
    from mlflow.entities import RunTag
    tags = _identity(pl, root)
    c.log_batch(pl.run_id, tags=[RunTag(tracking.TAG + k, v) for k, v in tags.items() if v is not None]
                + [RunTag(k, v) for k, v in tracking.operational_tags(pl.cfg).items()])  # this launch's cluster
    if pl.phase == "all" and pl.action == "resume":  # once evaluation-only, now pre-training itself
        old = c.get_run(pl.run_id).data.tags
        for k in ("pretrained_by", "pretrained_checkpoint"):
            if tracking.TAG + k in old:
                c.delete_tag(pl.run_id, tracking.TAG + k)


def _end_runs(c, parent: str | None, run_ids: list[str], reason: str, status: str) -> bool:
    """Ends what this launch leaves open (SCHEDULED/RUNNING), best effort: a store that just failed may
    fail again (-> False). Runs that already ended (a point that finished before the failure) keep their status."""
    ok = True
    for rid in [*run_ids, *([parent] if parent else [])]:
        try:
            if c.get_run(rid).info.status in ("FINISHED", "FAILED", "KILLED") and rid != parent:
                continue
            tracking.set_status(c, rid, status, reason)
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"warning: could not mark run {rid} {status}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    return ok


def backend_for(cfg, uri: str, root: Path, sweep: str, task_overrides: list[str], raw_uri: str) -> Backend:
    if cfg.cluster.backend == "slurm":
        from cluster.slurm import Slurm
        return Slurm(cfg, uri, root, sweep, task_overrides, raw_uri)
    from cluster.local import Local
    return Local(cfg, uri, root, sweep, task_overrides, raw_uri)
