"""What one SLURM array task runs: `python -m cluster.task MANIFEST`.

It picks its point by SLURM_ARRAY_TASK_ID, records the SLURM job in the point's MLflow run, and runs it.
When it ends, however it ends short of a kill, it attaches its SLURM output files to the run
(`logs/slurm-<array>_<task>.out` / `.err`). Its first start logs the wait since submission as `queue_s`.
USR2 (sent `signal_delay_s` before the time limit, or by `scancel --signal=USR2`) makes the training
loop write a checkpoint at the next step and stop; the task then requeues itself with `scontrol requeue`
-- at most `max_requeues` times -- and the requeued task resumes from that checkpoint into the same MLflow
run. SIGTERM (preemption, an external `scontrol requeue`, scancel) also checkpoints at the next step if
the grace time allows, but leaves the requeue decision to SLURM; a job killed outright resumes from its
latest periodic checkpoint, still bit-for-bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(manifest_path: str) -> int:
    started = time.time()  # before the heavy imports: they are the job's start-up, not its wait
    from core import tracking
    from core.config import REPO
    from core.job import run_point
    from core.training.loop import Preempted

    manifest = json.loads(open(manifest_path).read())
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    point = manifest["points"][index]
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', os.environ.get('SLURM_JOB_ID', '?'))}_{index}"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    rank = int(os.environ.get("SLURM_PROCID", "0"))

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        print(f"[mimsweep] got {stop['signal']}: checkpointing at the next step", flush=True)

    signal.signal(signal.SIGUSR2, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    c = tracking.client(manifest["uri"])
    if rank == 0:
        log = tracking.MetricLog(c, point["run_id"])
        log.tag(f"slurm_job_{manifest['phase']}", job)
        log.tag("slurm_restarts", str(restarts))
        log.tag("code", str(REPO))  # the launch's snapshot (cluster/snapshot.py) this task imports its code from
    print(f"[mimsweep] {point['label']} seed={point['seed']} sig={point['signature']} run={point['run_id']} "
          f"job={job} phase={manifest['phase']} restarts={restarts}", flush=True)
    # from submission to this task's start; a requeued task's own wait is not known
    queue_s = started - manifest["submitted_at"] if restarts == 0 and manifest.get("submitted_at") else None
    try:
        run_point(point["config"], point["run_id"], manifest["uri"], point["workdir"],
                  should_stop=lambda: stop["signal"] is not None, phase=manifest["phase"],
                  checkpoint=point.get("checkpoint"), queue_s=queue_s)
    except Preempted as e:
        if rank != 0:
            return 0
        if stop["signal"] == "SIGTERM":
            # Preemption, `scontrol requeue` or scancel: SLURM itself decides whether the job comes back.
            print(f"[mimsweep] {e}; leaving the requeue to SLURM", flush=True)
            return 0
        if restarts >= manifest["max_requeues"]:
            tracking.set_status(c, point["run_id"], "FAILED", f"stopped by {stop['signal']} after {restarts} requeue(s): {e}")
            return 1
        array_task = job
        print(f"[mimsweep] {e}; requeueing {array_task} ({restarts + 1}/{manifest['max_requeues']})", flush=True)
        res = subprocess.run(["scontrol", "requeue", array_task], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"[mimsweep] scontrol requeue failed: {res.stderr.strip()}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        if rank == 0 and manifest.get("log_dir"):
            attach_output(c, point["run_id"], Path(manifest["log_dir"]), job)
    return 0


def attach_output(c, run_id: str, log_dir: Path, job: str) -> None:
    """This task's SLURM output files (`<array>_<task>.out/.err`, as written so far) -> the run's `logs/`."""
    from core import tracking
    sys.stdout.flush()
    sys.stderr.flush()
    tracking.attach_files(c, run_id, {f"slurm-{job}{ext}": log_dir / f"{job}{ext}" for ext in (".out", ".err")},
                          "logs")


if __name__ == "__main__":
    from core.entry import run
    run(main, sys.argv[1])
