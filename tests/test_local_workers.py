"""Local launches with several points at once (`cluster.workers`, cluster/local.py): worker processes of
cpus/N threads. They compute what the one-after-another launch computes with the same thread count, an
evaluation-only point waits for its trainer, and every way a worker or the launch can die leaves runs
that say so (FAILED / KILLED) and no process behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.reliability import default_sigint
from tests.conftest import REPO, TINY, paced, popen, run_cli

BASE = [o for o in TINY if not o.startswith("cluster.workers")]  # each test says how many workers (or auto)
SWEEP = ["sweep=mcm_mask_ratio", *BASE]
# A launch the tests stop or kill (`_start`, paced: 0.3 s a step, 12 s or more a point); pixel targets (MCM's
# default target runs the EfficientNet teacher at every step: half of a tiny model's step)
LONG = [*SWEEP, "pretrain.epochs=20", "pretrain.max_steps=40", "pretrain.checkpoint_every=4",
        "method.target=norm_pixel"]


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _points(out: Path) -> dict:
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    return {r.data.tags["mimsweep.label"]: r for r in runs if r.data.tags.get("mimsweep.kind") == "point"}


def _history(out: Path) -> dict:
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    return {name: {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)]
                   for k in ("train_loss", "knn_top1", "linear_top1")} for name, r in _points(out).items()}


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "PYTHONPATH": str(REPO), **paced()}
    env.pop("MLFLOW_TRACKING_URI", None)
    return popen([sys.executable, "sweeps/run.py", *LONG, f"output_root={out}", *extra], cwd=REPO, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                 preexec_fn=default_sigint)


def _wait_for_training(out: Path, p: subprocess.Popen, n: int = 2) -> list[int]:
    """-> the worker pids, once `n` points have written a checkpoint. The launch's children are the fork
    server and multiprocessing's resource tracker; the workers are the fork server's children."""
    deadline = time.time() + 180
    while time.time() < deadline and len(list(out.glob("runs/*/*/checkpoint.pt"))) < n:
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.2)
    workers = [w for child in _children(p.pid) for w in _children(child)]
    assert len(workers) == 2, workers
    return workers


def test_two_workers_compute_what_one_after_another_computes_with_the_same_threads(tmp_path):
    threads = max(1, _cpus() // 2)
    par = run_cli("sweeps/run.py", *SWEEP, f"output_root={tmp_path / 'par'}", "cluster.workers=2")
    assert par.returncode == 0, par.stdout + par.stderr
    assert f"running 2 points at a time, {threads} thread(s) each" in par.stdout
    assert "  60% | evaluate knn:" in par.stdout and "  90% | evaluate linear:" in par.stdout  # labelled lines
    seq = run_cli("sweeps/run.py", *SWEEP, f"output_root={tmp_path / 'seq'}", "cluster.workers=1",
                  env={"OMP_NUM_THREADS": str(threads)})
    assert seq.returncode == 0, seq.stdout + seq.stderr
    assert "points at a time" not in seq.stdout
    a, b = _history(tmp_path / "par"), _history(tmp_path / "seq")
    assert sorted(a) == ["60%", "75%", "80%", "90%"] and all(len(h["train_loss"]) == 3 for h in a.values())
    assert a == b                                  # bit-identical, every point, every logged step
    # the summary keeps the grid's order, whichever point ended first
    order = [ln.split()[0] for ln in par.stdout.split("\nsummary", 1)[1].splitlines()[2:6]]
    assert order == ["60%", "75%", "80%", "90%"], par.stdout


def test_an_evaluation_only_point_starts_after_its_trainer_has_ended(tmp_path):
    res = run_cli("sweeps/run.py", *SWEEP, f"output_root={tmp_path}", "cluster.workers=2", "~sweep.grid",
                  "+sweep.points=[{label:k5,overrides:['evaluate.knn.k=5']},"
                  "{label:k10,overrides:['evaluate.knn.k=10']}]")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = _points(tmp_path)
    trainer, evaluator = runs["k5"], runs["k10"]
    assert evaluator.data.tags["mimsweep.pretrained_by"] == trainer.info.run_id
    assert {trainer.info.status, evaluator.info.status} == {"FINISHED"}
    # the evaluator's job began (its run went RUNNING) only once the trainer's run had ended
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    started = [m.timestamp for m in c.get_metric_history(evaluator.info.run_id, "knn_top1")]
    assert trainer.info.end_time <= min(started), (trainer.info.end_time, started)
    assert res.stdout.index("k5: done in") < res.stdout.index("[2/2] k10"), res.stdout


def test_a_killed_worker_fails_its_point_the_others_finish_and_a_relaunch_resumes_it(tmp_path):
    out = tmp_path / "out"
    p = _start(out, "cluster.workers=2")
    workers = _wait_for_training(out, p)
    os.kill(workers[0], signal.SIGKILL)
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 1, text
    assert "the worker process running it died (SIGKILL)" in text, text
    runs = _points(out)
    failed = [n for n, r in runs.items() if r.info.status == "FAILED"]
    assert len(failed) == 1 and sum(r.info.status == "FINISHED" for r in runs.values()) == 3, text
    assert "died (SIGKILL)" in runs[failed[0]].data.tags["mimsweep.failure"]
    again = run_cli("sweeps/run.py", *LONG, f"output_root={out}", "cluster.workers=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(rf"^  resume +{re.escape(failed[0])} ", again.stdout, re.M), again.stdout
    assert {r.info.status for r in _points(out).values()} == {"FINISHED"}


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "SIGTERM to the group"])
def test_the_launch_stopped_or_killed_stops_its_workers_and_their_runs_end_killed(tmp_path, how):
    out = tmp_path / "out"
    p = _start(out, "cluster.workers=2")
    workers = _wait_for_training(out, p)
    if how == "SIGTERM to the group":  # as a shell's `kill %1`: the launch, its fork server and resource tracker
        os.killpg(p.pid, signal.SIGTERM)            # (the workers are in groups of their own)
    else:
        os.kill(p.pid, getattr(signal, how))       # the launch only
    text = p.communicate(timeout=180)[0]
    if how != "SIGKILL":
        assert p.returncode == 130, text
        assert ("interrupted by signal SIGTERM" if how.startswith("SIGTERM") else "interrupted by Ctrl-C (SIGINT)") \
            in text, text
    deadline = time.time() + 60                    # after -9, each worker notices within a second
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
    runs = _points(out)
    statuses = sorted(r.info.status for r in runs.values())
    # the two that were running end KILLED by themselves; the two waiting ones never started, so they have no
    # run (a point's run is created when its job starts), even after -9: nothing is left SCHEDULED
    assert statuses == ["KILLED", "KILLED"], (statuses, text)
    reasons = sorted(r.data.tags.get("mimsweep.failure", "") for r in runs.values() if r.info.status == "KILLED")
    said = "the launch process died" if how == "SIGKILL" else "the launch was stopped"
    assert sum(said in x for x in reasons) == 2, reasons
    # the relaunch runs its points one after another: resuming through two workers is the killed-worker test's
    again = run_cli("sweeps/run.py", *LONG, f"output_root={out}", "cluster.workers=1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert {r.info.status for r in _points(out).values()} == {"FINISHED"}


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_workers_value_is_refused_before_anything_is_created(tmp_path, value):
    res = run_cli("sweeps/run.py", *SWEEP, f"output_root={tmp_path}", f"cluster.workers={value}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cluster.workers" in res.stderr and "must be an integer in [1, 1024]" in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())


def test_auto_runs_one_worker_per_core_up_to_the_points(tmp_path):
    res = run_cli("sweeps/run.py", *SWEEP, f"output_root={tmp_path}", "dry_run=true")
    assert res.returncode == 0, res.stdout + res.stderr
    w = min(4, _cpus())
    how = "one after another" if w == 1 else f"{w} at a time, {_cpus() // w} thread(s) each"
    assert f"4 point(s) would run here, {how}" in res.stdout, res.stdout
    one = run_cli("sweeps/run.py", *BASE, f"output_root={tmp_path}", "dry_run=true")
    assert "1 point(s) would run here, one after another" in one.stdout, one.stdout
