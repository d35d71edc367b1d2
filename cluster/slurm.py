"""SLURM backend: a sweep launch becomes one job array (split above MaxArraySize), then returns.

Each array task runs `python -m cluster.task MANIFEST` on its node: the manifest lists the points of
the array (resolved config, MLflow run id, tracking URI, work folder), the task picks its own by
SLURM_ARRAY_TASK_ID. Nothing has to stay alive on the login node: results arrive in MLflow.

Why not hydra-submitit-launcher for sweeps: it blocks until every job ends and never requeues on
timeout by default (ENV.md); a launch here queues and returns. The sbatch script is plain text, printed
by `dry_run=true`, so what reaches the scheduler is always visible. The launcher does serve ad-hoc grids:
`python sweeps/run.py -m hydra/launcher=submitit_slurm method.mask_ratio=0.6,0.75` makes one SLURM job
per value, and each runs `launch()` with cluster=local inside its job, so tracking, skip and resume are a
launch's (tests/test_slurm.py runs it on the local cluster); such jobs import the live tree, no snapshot.

Why submitit is not a dependency of ours (hydra-submitit-launcher brings it): submission is the sbatch
script above; rank and world size are three SLURM variables (core/job.py dist_env), what
submitit.JobEnvironment reads too; the code snapshot is cluster/snapshot.py (why not RsyncSnapshot: there).
The array tasks `cd` into the launch's snapshot, not the live working tree.

Safe by construction: every value of the script went through cluster/checks.py (no control
characters, plain tokens for `#SBATCH --partition/account/qos/constraint`, integers for resources) and
is checked again here as it is written; paths (`--output`, the repository, the interpreter, the
manifest) are quoted, so an output_root with spaces works.

Credentials: the script and the manifest hold the tracking URI *without* user-info. The job gets
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's own variables, read by its client)
through the environment sbatch exports (`--export=ALL`; core.tracking.use_credentials put them into
the launcher's environment). SLURM keeps a job's environment in its state directory, readable by the
SLURM user only, and does not print it; the secret is in no file we write, no log, no MLflow field.
Manifests are written mode 600 all the same (they hold the resolved configs).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cluster.backend import Backend
from cluster.checks import CONTROL, TOKEN
from core.config import REPO, ConfigError

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def _run(cmd: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- checks before anything is submitted
UNREACHABLE = ("Unable to contact slurm controller", "Slurmctld(primary) at", "Socket timed out", "Connection refused")


def unreachable(detail: str) -> ConfigError:
    """The error for a controller that does not answer (not a resource problem: the fix is to start it)."""
    return ConfigError("cluster", "slurm", f"the SLURM controller does not answer ({detail.strip().splitlines()[0]})",
                       "Start it (bash cluster/local_slurm.sh up), or check SLURM_CONF; nothing was created.")


def preflight(cl) -> int:
    """Fail early with what to change; returns the cluster's MaxArraySize."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            raise ConfigError("cluster", "slurm", f"`{tool}` is not on PATH on this machine",
                              "Launch from a SLURM login node, or use cluster=local (for a local test cluster: "
                              "bash cluster/local_slurm.sh up).")
    ping = _run(["scontrol", "ping"], timeout=30)  # answers at once; sinfo retries a dead controller for ~10 s
    if ping.returncode != 0 or "DOWN" in ping.stdout:
        raise unreachable(ping.stdout + ping.stderr)
    nodes = partitions()
    if cl.partition and cl.partition not in nodes:
        raise ConfigError("cluster.partition", cl.partition, "is not a partition of this cluster "
                          f"(sinfo lists: {', '.join(sorted(nodes)) or 'none'})")
    part = cl.partition or next((p for p, n in nodes.items() if n["default"]), None)
    if part in nodes:
        check_resources(cl, "cluster", part, nodes[part])
        if cl.get("separate_eval"):
            check_resources(cl.eval, "cluster.eval", part, nodes[part])
    res = _run(["scontrol", "show", "config"])
    m = re.search(r"MaxArraySize\s*=\s*(\d+)", res.stdout)
    return int(m.group(1)) if m else 1001


def _minutes(limit: str) -> float:
    """SLURM's time limit ([D-]HH:MM:SS, MM:SS, MM, D-HH[:MM], infinite) in minutes."""
    if limit.lower() in ("infinite", "unlimited", "n/a", ""):
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + sec / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)


def partitions() -> dict[str, dict]:
    """{partition: the largest node's cpus, memory (MiB) and GPUs, its time limit (min), default?}: one sinfo call."""
    res = _run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"])
    if res.returncode != 0:
        raise unreachable(res.stderr or res.stdout) if any(u in res.stderr for u in UNREACHABLE) else ConfigError(
            "cluster", "slurm", f"sinfo failed: {(res.stderr or res.stdout).strip()[:200]}")
    out: dict[str, dict] = {}
    for line in res.stdout.splitlines():
        name, cpus, mem, gres, limit = (line.split("|") + [""] * 5)[:5]
        gpus = sum(int(re.sub(r"\(.*", "", g).rsplit(":", 1)[-1] or 0) for g in gres.split(",")
                   if g.startswith("gpu") and re.sub(r"\(.*", "", g).rsplit(":", 1)[-1].isdigit())
        n = out.setdefault(name.rstrip("*"), {"cpus": 0, "mem_mb": 0, "gpus": 0, "time_min": 0.0,
                                              "default": name.endswith("*")})
        n["cpus"] = max(n["cpus"], int(re.sub(r"\D", "", cpus) or 0))
        n["mem_mb"] = max(n["mem_mb"], int(re.sub(r"\D.*", "", mem) or 0))
        n["gpus"] = max(n["gpus"], gpus)
        n["time_min"] = max(n["time_min"], _minutes(limit))
    return out


def check_resources(res, prefix: str, partition: str, node: dict) -> None:
    """Each resource the job asks for fits the partition's largest node (named by its key; sbatch --test-only
    would only say that the request cannot be satisfied)."""
    procs = max(int(res.gpus_per_task or 0), 1)   # one process per GPU (sbatch_script's --ntasks-per-node)
    where = f"the largest node of partition {partition}"
    if res.gpus_per_task * procs > node["gpus"]:
        raise ConfigError(f"{prefix}.gpus_per_task", res.gpus_per_task, f"{res.gpus_per_task * procs} GPUs is more "
                          f"than {where} has ({node['gpus']})", "gpus_per_task=0 runs on CPUs.")
    if res.cpus_per_task * procs > node["cpus"]:
        raise ConfigError(f"{prefix}.cpus_per_task", res.cpus_per_task, f"{res.cpus_per_task * procs} CPUs "
                          f"({procs} process(es)) is more than {where} has ({node['cpus']})")
    if res.mem_gb * 1024 > node["mem_mb"]:
        raise ConfigError(f"{prefix}.mem_gb", res.mem_gb, f"is more memory than {where} has "
                          f"({node['mem_mb'] / 1024:.1f} GiB)")
    if res.time_min > node["time_min"]:
        raise ConfigError(f"{prefix}.time_min", res.time_min, f"is longer than partition {partition}'s time limit "
                          f"({node['time_min']:.0f} min)")


def test_only(script: str) -> None:
    """`sbatch --test-only`: the scheduler says whether the request can ever run, submitting nothing."""
    res = subprocess.run(["sbatch", "--test-only", "--export=ALL"], input=script, capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        if any(u in (res.stderr or res.stdout) for u in UNREACHABLE):
            raise unreachable(res.stderr or res.stdout)
        raise ConfigError("cluster", "slurm", "the scheduler rejects this resource request: "
                          + (msg[-1] if msg else f"sbatch exit {res.returncode}"),
                          "Change cluster.gpus_per_task, cluster.cpus_per_task, cluster.mem_gb, cluster.time_min "
                          "or cluster.partition (cluster.eval.* for the evaluation array); nothing was created.")


# ---------------------------------------------------------------- the sbatch script
def _plain(key: str, value) -> str:
    """A value for `#SBATCH --opt=value`: one token, no whitespace, quote or control character."""
    v = str(value)
    if not v or CONTROL.search(v) or re.search(r"[\s\"'\\$`;]", v):
        raise ConfigError(key, value, "cannot be written into the job script: it must be a single plain token")
    return v


def _sbatch_path(key: str, folder: Path, pattern: str) -> str:
    """`folder/pattern` for `#SBATCH --output=`: double-quoted (sbatch's own parser takes quotes, so spaces
    work), a `%` of the folder doubled (sbatch expands %A, %a, ... in file names; %% is a literal %)."""
    p = str(folder)
    if CONTROL.search(p) or '"' in p:
        raise ConfigError(key, p, 'cannot be used for SLURM logs: no control characters or " in the path')
    return '"' + p.replace("%", "%%") + "/" + pattern + '"'


def _shell_arg(key: str, value: str) -> str:
    if CONTROL.search(value):
        raise ConfigError(key, value, "cannot be written into the job script: it contains a control character")
    return shlex.quote(value)


def job_name(sweep: str) -> str:
    """`mimsweep-<sweep>`, reduced to characters that need no quoting anywhere."""
    return "mimsweep-" + (re.sub(r"[^A-Za-z0-9_.+-]", "_", sweep)[:100] or "sweep")


def sbatch_script(cl, manifest: Path, n_tasks: int, job_name: str, log_dir: Path, phase: str,
                  dependency: str | None = None, code: Path = REPO) -> str:
    """`code`: the folder the task runs from (the launch's snapshot, cluster/snapshot.py)."""
    res = cl.eval if phase == "evaluate" else cl
    procs = max(int(res.gpus_per_task or 0), 1)
    pre = "cluster.eval" if phase == "evaluate" else "cluster"
    n = lambda key, v: _plain(key, int(v) if isinstance(v, int) else v)  # noqa: E731
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={_plain('sweep.name', job_name)}",
             f"#SBATCH --array=0-{int(n_tasks) - 1}%{min(int(cl.array_parallelism), int(n_tasks))}",
             f"#SBATCH --output={_sbatch_path('output_root', log_dir, '%A_%a.out')}",
             f"#SBATCH --error={_sbatch_path('output_root', log_dir, '%A_%a.err')}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --time={n(pre + '.time_min', res.time_min)}",
             f"#SBATCH --cpus-per-task={n(pre + '.cpus_per_task', res.cpus_per_task)}",
             f"#SBATCH --mem={n(pre + '.mem_gb', res.mem_gb)}G",
             f"#SBATCH --ntasks-per-node={procs}",
             "#SBATCH --nodes=1",
             "#SBATCH --requeue"]
    # One process: python *is* the batch shell (exec), so the signal goes to the batch step (B:).
    # Several (DDP): srun starts them and every step gets the signal.
    lines.append(f"#SBATCH --signal={'B:' if procs == 1 else ''}USR2@{n('cluster.signal_delay_s', cl.signal_delay_s)}")
    if res.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={n(pre + '.gpus_per_task', res.gpus_per_task)}")
    for key in ("partition", "account", "qos", "constraint"):
        if cl.get(key):
            value = _plain(f"cluster.{key}", cl[key])
            if not re.fullmatch(TOKEN[key][0], value):
                raise ConfigError(f"cluster.{key}", value, "cannot be written into the job script")
            lines.append(f"#SBATCH --{key}={value}")
    if dependency:
        dep = re.sub(r"<array \d+ job id>", "0", dependency)
        _plain("dependency", dep)
        lines += [f"#SBATCH --dependency={dependency}", "#SBATCH --kill-on-invalid-dep=yes"]
    python = cl.python or sys.executable
    setup = list(cl.setup or [])  # shell lines by design: only checked to be single lines
    for i, line in enumerate(setup):
        _shell_arg(f"cluster.setup[{i}]", line)
    lines += ["", "set -e", *setup, f"cd {_shell_arg('output_root', str(code))}",
              f"export PYTHONPATH={_shell_arg('output_root', str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
              "export MIMSWEEP_PROGRESS=0",
              # No cgroups on every site: keep PyTorch's threads within the CPUs the task was given.
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              f"{'exec' if procs == 1 else 'exec srun --kill-on-bad-exit=1'} {_shell_arg('cluster.python', python)} "
              f"-m cluster.task {_shell_arg('output_root', str(manifest))}"]
    return "\n".join(lines) + "\n"


def write_manifest(path: Path, points: list, uri: str, root: Path, phase: str, max_requeues: int,
                   log_dir: Path | None = None) -> None:
    """The task's instructions, mode 600. `uri` carries no credentials (they travel in the environment).
    `log_dir`: where SLURM writes the tasks' output (each task attaches its own files to its run);
    `submitted_at`: now, from which a task's first start measures its queue wait (`queue_s`)."""

    from core.tracking import redact_text, split_credentials
    clean = split_credentials(uri)[0]
    body = {"phase": phase, "max_requeues": max_requeues, "uri": clean, "submitted_at": time.time(),
            "log_dir": str(log_dir) if log_dir else None, "points": [
        {"label": pl.point.label, "seed": pl.point.seed, "signature": pl.signature, "run_id": pl.run_id,
         "workdir": str(root / pl.workdir_name), "checkpoint": getattr(pl, "checkpoint", None),
         "config": pl.config_yaml()}
        for pl in points]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(redact_text(json.dumps(body), uri))
    os.chmod(tmp, 0o600)  # also when the file existed with wider permissions
    os.replace(tmp, path)


def sbatch(script: str) -> str:
    # --export=ALL: the job gets this environment, MLflow's credential variables included (never the script).
    res = subprocess.run(["sbatch", "--parsable", "--export=ALL"], input=script, capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip().split(";")[0]


# ---------------------------------------------------------------- what the queue says
def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{'<array>_<task>': STATE} for the given tasks, from one squeue and (for the rest) one sacct call."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    res = _run(["squeue", "-h", "-r", "-o", "%i|%T"])
    for line in res.stdout.split():
        jid, _, st = line.partition("|")
        states[jid] = st
    missing = [j for j in job_ids if j not in states]
    if missing:
        arrays = sorted({j.split("_")[0] for j in missing})
        res = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)])
        for line in res.stdout.splitlines():
            jid, _, st = line.partition("|")
            if jid in missing and jid not in states:
                states[jid] = st.split()[0] if st else "UNKNOWN"
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


# ---------------------------------------------------------------- submission
def _array_placeholder(k: int) -> str:
    return f"<array {k} job id>"


def prepare(todo: list, cl, root: Path, sweep: str, max_array: int, code: Path = REPO) -> list[dict]:
    """The array(s) for `todo`, at most MaxArraySize tasks each, nothing written or submitted:
    [{'phase', 'tasks', 'script', 'manifest', 'points', 'log_dir', 'job_id': None}]. Scripts do not depend on
    the points' run ids, so the launch can `test_only` them before any MLflow run exists.

    Points that pre-train: phase `all` (or `pretrain` + an `evaluate` array chained task by task when
    cluster.separate_eval). Points that only evaluate another run's pre-training (sweeps/plan.py, phase
    `evaluate`): evaluation arrays, one per pre-training they wait for: none (it finished), a task of this
    launch's arrays, or a task of an earlier launch still queued or running (`afterok` on that task)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slurm_dir = root / "slurm" / stamp
    log_dir = slurm_dir / "logs"
    chunk = max(max_array - 1, 1)  # array indices run 0..MaxArraySize-1
    arrays, task_of = [], {}       # task_of: id(trainer point) -> (array index, task index)

    def add(phase: str, part: list, name: str, dependency: str | None):
        manifest = slurm_dir / f"{name}-{phase}.json"
        script = sbatch_script(cl, manifest, len(part), job_name(sweep), log_dir, phase, dependency, code)
        arrays.append({"phase": phase, "tasks": len(part), "script": script, "manifest": manifest,
                       "points": part, "log_dir": log_dir, "job_id": None})

    trainers = [pl for pl in todo if getattr(pl, "phase", "all") == "all"]
    for ci in range(0, len(trainers), chunk):
        part = trainers[ci: ci + chunk]
        first = len(arrays)
        task_of.update({id(pl): (first, i) for i, pl in enumerate(part)})
        if cl.separate_eval:
            # aftercorr: evaluation task i starts when pretraining task i completed successfully; with
            # --kill-on-invalid-dep a failed pretraining cancels its evaluation instead of pending forever.
            add("pretrain", part, f"array{ci // chunk}", None)
            add("evaluate", part, f"array{ci // chunk}", f"aftercorr:{_array_placeholder(first)}")
        else:
            add("all", part, f"array{ci // chunk}", None)
    groups: dict = {}              # the dependency of an evaluation-only array -> its points
    for pl in (pl for pl in todo if getattr(pl, "phase", "all") == "evaluate"):
        after = pl.after
        if after is None or isinstance(after, str):
            dep = f"afterok:{after}" if after else None
        else:  # a trainer of this launch: its task (of the pretrain array when evaluation is separate)
            k, i = task_of[id(after)]
            dep = f"afterok:{_array_placeholder(k)}_{i}"
        groups.setdefault(dep, []).append(pl)
    for gi, (dep, pls) in enumerate(groups.items()):
        for ci in range(0, len(pls), chunk):
            add("evaluate", pls[ci: ci + chunk], f"evalonly{gi}-{ci // chunk}", dep)
    return arrays


def submit_prepared(arrays: list[dict], cl, uri: str, root: Path) -> None:
    """Write each array's manifest (the points' run ids are known now) and sbatch it; sets 'job_id'.
    On a failure, the arrays queued so far keep their job_id (the others None) and the error propagates."""
    for a in arrays:
        for k, b in enumerate(arrays):  # arrays only wait for arrays before them
            if b["job_id"]:
                a["script"] = a["script"].replace(_array_placeholder(k), b["job_id"])
        a["log_dir"].mkdir(parents=True, exist_ok=True)
        write_manifest(a["manifest"], a["points"], uri, root, a["phase"], cl.max_requeues, a["log_dir"])
        a["job_id"] = sbatch(a["script"])


def submit(todo: list, cl, uri: str, root: Path, sweep: str, dry_run: bool = False,
           max_array: int | None = None) -> list[dict]:
    """Queue `todo` as array(s) of at most MaxArraySize tasks each (asked of the cluster unless given);
    returns [{'job_id', 'phase', 'tasks', 'script', ...}] (no job_id when dry)."""
    if max_array is None:
        max_array = 1001 if dry_run and shutil.which("sbatch") is None else preflight(cl)
    arrays = prepare(todo, cl, root, sweep, max_array)
    if not dry_run and arrays:
        test_only(arrays[0]["script"])
        submit_prepared(arrays, cl, uri, root)
    return arrays



class Slurm(Backend):
    """One job array per launch (split above MaxArraySize), run from a snapshot of the launch's code."""

    def prepare(self, planned, todo, trained):
        from cluster import snapshot
        from sweeps.plan import skip_queued
        self.snap = snapshot.plan(self.cfg.output_root)   # the tasks run this copy of the code, not the live tree
        if not self.cfg.dry_run or shutil.which("sbatch"):
            max_array = preflight(self.cfg.cluster)
            if not self.cfg.dry_run:
                skip_queued(planned, trained, self.live_jobs)
                todo = sorted((pl for pl in todo if pl.action in ("new", "resume")),
                              key=lambda pl: pl.pretrain == "after")
            self.arrays = prepare(todo, self.cfg.cluster, self.root, self.sweep, max_array, self.snap.path)
            if self.arrays:
                test_only(self.arrays[0]["script"])         # before any MLflow run exists
        else:
            self.arrays = prepare(todo, self.cfg.cluster, self.root, self.sweep, 1001, self.snap.path)
        if self.uri.startswith("sqlite"):
            print("note: SLURM tasks will write to a SQLite file. That is fine on one machine; on a cluster's shared "
                  "filesystem many writers corrupt it: use a tracking server (tracking.uri=http://HOST:5000).")
        return todo

    def live_jobs(self, job_ids):
        return {j: st for j, st in queue_states(job_ids).items() if st in ACTIVE}

    def describe(self, todo) -> str:
        text = [f"--- sbatch script ({a['phase']}, {a['tasks']} task(s)) ---\n{a['script']}" for a in self.arrays]
        if self.arrays:
            text.append(f"dry run: {len(self.arrays)} sbatch call(s) for {len(todo)} point(s); nothing was submitted.")
        else:
            text.append("dry run: nothing was started.")
        return "\n".join(text)

    def start(self, c, parent, todo, handed_over, skipped) -> int:
        from cluster import snapshot
        snapshot.write(self.snap)
        snapshot.record(c, parent, self.snap)
        return _submit(c, parent, todo, self.arrays, self.cfg, self.uri, self.root, self.command("cluster/status.py"),
                       handed_over)


def _submit(c, parent: str, todo: list, arrays: list[dict], cfg, uri: str, root: Path, status_cmd: str,
            handed_over: set) -> int:
    from core import tracking
    try:
        submit_prepared(arrays, cfg.cluster, uri, root)
    finally:
        # A point belongs to its jobs once every array holding it is queued (pretrain *and* evaluate);
        # a half-queued chunk (evaluation sbatch failed) is cancelled, and its points marked FAILED.
        jobs: dict[str, list] = {}
        for a in arrays:
            for pl in a["points"]:
                jobs.setdefault(pl.run_id, []).append(a["job_id"])
        partial = sorted({j for ids in jobs.values() if None in ids for j in ids if j})
        if partial:
            subprocess.run(["scancel", *partial], capture_output=True, timeout=60)
        handed_over.update(rid for rid, ids in jobs.items() if None not in ids)
        tasks: dict[str, dict] = {}  # {run id: {tag: array task}}, written in one transaction where the store can
        for a in arrays:
            if a["job_id"] and a["job_id"] not in partial:
                for i, pl in enumerate(a["points"]):
                    tasks.setdefault(pl.run_id, {})[f"{tracking.TAG}slurm_job_{a['phase']}"] = f"{a['job_id']}_{i}"
        if not c.call(tracking.bulk.set_tags, c, tasks, what="the points' tasks"):  # c: cluster/launch.py Patient
            for rid, kv in tasks.items():
                for k, v in kv.items():
                    c.set_tag(rid, k, v)
        ids = [a["job_id"] for a in arrays if a["job_id"] and a["job_id"] not in partial]
        if ids:
            c.set_tag(parent, tracking.TAG + "slurm_arrays", ",".join(ids))
    tracking.set_status(c, parent, "FINISHED")  # the launch is done; the points report into their own runs
    print(f"queued {len(todo)} point(s) as {len(arrays)} array job(s): {', '.join(ids)}")
    print(f"follow them with: {status_cmd}  (MLflow: {tracking.redact(uri)})")
    return 0
