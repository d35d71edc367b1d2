"""SLURM backend: a sweep launch becomes one job array (split above MaxArraySize), then returns.

Each array task runs `python -m cluster.task MANIFEST` on its node: the manifest lists the points of
the array (resolved config, MLflow run id, tracking URI, work folder), the task picks its own by
SLURM_ARRAY_TASK_ID. Nothing has to stay alive on the login node: results arrive in MLflow.

Why not hydra-submitit-launcher: it blocks until every job ends and never requeues on timeout by
default (ENV.md); a launch here queues and returns. The sbatch script is plain text, printed by
`dry_run=true`, so what reaches the scheduler is always visible.
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

from core.config import REPO, ConfigError

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def _run(cmd: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- checks before anything is submitted
def preflight(cl) -> int:
    """Fail early with what to change; returns the cluster's MaxArraySize."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            raise ConfigError("cluster", "slurm", f"`{tool}` is not on PATH on this machine",
                              "Launch from a SLURM login node, or use cluster=local (for a local test cluster: "
                              "bash cluster/local_slurm.sh up).")
    if cl.partition:
        res = _run(["sinfo", "-h", "-o", "%P"])
        parts = {p.rstrip("*") for p in res.stdout.split()}
        if cl.partition not in parts:
            raise ConfigError("cluster.partition", cl.partition, "is not a partition of this cluster "
                              f"(sinfo lists: {', '.join(sorted(parts)) or 'none'})")
    res = _run(["scontrol", "show", "config"])
    m = re.search(r"MaxArraySize\s*=\s*(\d+)", res.stdout)
    return int(m.group(1)) if m else 1001


def test_only(script: str) -> None:
    """`sbatch --test-only`: the scheduler says whether the request can ever run, submitting nothing."""
    res = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise ConfigError("cluster", "slurm", "the scheduler rejects this resource request: "
                          + (msg[-1] if msg else f"sbatch exit {res.returncode}"),
                          "Change cluster.gpus_per_task / cpus_per_task / mem_gb / time_min / partition.")


# ---------------------------------------------------------------- the sbatch script
def sbatch_script(cl, manifest: Path, n_tasks: int, job_name: str, log_dir: Path, phase: str,
                  dependency: str | None = None) -> str:
    res = cl.eval if phase == "evaluate" else cl
    procs = max(int(res.gpus_per_task or 0), 1)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --array=0-{n_tasks - 1}%{min(cl.array_parallelism, n_tasks)}",
             f"#SBATCH --output={log_dir}/%A_%a.out",
             f"#SBATCH --error={log_dir}/%A_%a.err",
             "#SBATCH --open-mode=append",
             f"#SBATCH --time={res.time_min}",
             f"#SBATCH --cpus-per-task={res.cpus_per_task}",
             f"#SBATCH --mem={res.mem_gb}G",
             f"#SBATCH --ntasks-per-node={procs}",
             "#SBATCH --nodes=1",
             "#SBATCH --requeue"]
    # One process: python *is* the batch shell (exec), so the signal goes to the batch step (B:).
    # Several (DDP): srun starts them and every step gets the signal.
    lines.append(f"#SBATCH --signal={'B:' if procs == 1 else ''}USR2@{cl.signal_delay_s}")
    if res.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={res.gpus_per_task}")
    for key in ("partition", "account", "qos", "constraint"):
        if cl.get(key):
            lines.append(f"#SBATCH --{key}={cl[key]}")
    if dependency:
        lines += [f"#SBATCH --dependency={dependency}", "#SBATCH --kill-on-invalid-dep=yes"]
    python = cl.python or sys.executable
    lines += ["", "set -e", *list(cl.setup or []), f"cd {shlex.quote(str(REPO))}",
              f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
              "export MIMSWEEP_PROGRESS=0",
              # No cgroups on every site: keep PyTorch's threads within the CPUs the task was given.
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              f"{'exec' if procs == 1 else 'exec srun --kill-on-bad-exit=1'} {shlex.quote(python)} -m cluster.task "
              f"{shlex.quote(str(manifest))}"]
    return "\n".join(lines) + "\n"


def write_manifest(path: Path, points: list, uri: str, root: Path, phase: str, max_requeues: int) -> None:
    from omegaconf import OmegaConf
    body = {"phase": phase, "max_requeues": max_requeues, "uri": uri, "points": [
        {"label": pl.point.label, "seed": pl.point.seed, "signature": pl.signature, "run_id": pl.run_id,
         "workdir": str(root / pl.workdir_name), "config": OmegaConf.to_yaml(pl.cfg, resolve=True)}
        for pl in points]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def sbatch(script: str) -> str:
    res = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, timeout=120)
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
def submit(todo: list, cl, uri: str, root: Path, sweep: str, dry_run: bool = False,
           max_array: int | None = None) -> list[dict]:
    """Queue `todo` as array(s) of at most MaxArraySize tasks each (asked of the cluster unless given);
    returns [{'job_id', 'phase', 'tasks', 'script'}] (no job_id when dry)."""
    if max_array is None:
        max_array = 1001 if dry_run and shutil.which("sbatch") is None else preflight(cl)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slurm_dir = root / "slurm" / stamp
    log_dir = slurm_dir / "logs"
    chunk = max(max_array - 1, 1)  # array indices run 0..MaxArraySize-1
    submitted = []
    for ci in range(0, len(todo), chunk):
        part = todo[ci: ci + chunk]
        phases = ["pretrain", "evaluate"] if cl.separate_eval else ["all"]
        dependency = None
        for phase in phases:
            manifest = slurm_dir / f"array{ci // chunk}-{phase}.json"
            script = sbatch_script(cl, manifest, len(part), f"mimsweep-{sweep}", log_dir, phase, dependency)
            entry = {"phase": phase, "tasks": len(part), "script": script, "job_id": None}
            submitted.append(entry)
            if not dry_run:
                if ci == 0 and phase == phases[0]:
                    test_only(script)
                log_dir.mkdir(parents=True, exist_ok=True)
                write_manifest(manifest, part, uri, root, phase, cl.max_requeues)
                entry["job_id"] = sbatch(script)
            # aftercorr: evaluation task i starts when pretraining task i completed successfully; with
            # --kill-on-invalid-dep a failed pretraining cancels its evaluation instead of pending forever.
            dependency = f"aftercorr:{entry['job_id'] or '<pretrain array job id>'}"
    return submitted
