"""Live progress (cluster/progress.py) and `cluster/status.py --watch` on a real local sweep run in the background."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cluster import progress
from tests.conftest import REPO, TINY, popen, run_cli


def test_eta_from_the_step_rate_and_the_progress_by_hand():
    # 20 steps in 20 s over the history: 1 step/s; progress 0.25 at step 20 -> 80 steps in all, 60 to go: 60 s
    run = SimpleNamespace(data=SimpleNamespace(metrics={"progress": 0.25, "train_loss": 0.6},
                                               params={"pretrain.batch_size": "64"}))
    p = progress.progress_of(run, [(0, 1.0, 0), (10, 0.8, 10_000), (20, 0.6, 20_000)])
    assert (p.step, p.loss, p.steps_per_s, p.eta_s) == (20, 0.6, 1.0, 60.0)
    # one logged step: the rate comes from the throughput (128 img/s at batch 64 = 2 steps/s) -> 30 s
    run.data.metrics["throughput_img_s"] = 128.0
    assert progress.progress_of(run, [(20, 0.6, 20_000)]).eta_s == 30.0
    assert progress.fmt_duration(3725) == "1 h 02 min" and progress.fmt_duration(61) == "1 min 01 s"


def test_histories_in_bulk_from_a_real_store(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from core import tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri, create=True)
    c = MlflowClient(uri)
    exp = c.create_experiment("x")
    a, b = (c.create_run(exp).info.run_id for _ in range(2))
    c.log_batch(a, metrics=[Metric("train_loss", 1.0 / (s + 1), 1000 + s, s) for s in reversed(range(10))])
    c.log_batch(b, metrics=[Metric("train_loss", 2.0, 5, 0), Metric("lr", 1.0, 5, 0)])
    h = progress.histories(c, [a, b])
    assert [s for s, _, _ in h[a]] == list(range(10)) and h[b] == [(0, 2.0, 5)]
    sampled = progress.histories(c, [a], points=4)[a]
    assert [s for s, _, _ in sampled] == [0, 3, 6, 9]                  # evenly spaced, first and last kept


def test_watch_follows_a_real_sweep_until_it_ends(tmp_path):
    from mlflow.tracking import MlflowClient
    sweep = ["sweep=mcm_mask_ratio", *TINY, "sweep.grid={method.mask_ratio:[0.6]}", f"output_root={tmp_path}",
             "pretrain.epochs=20", "pretrain.max_steps=60", "pretrain.log_every=2", "pretrain.checkpoint_every=10"]
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "launch.log", "w")  # a file, not a pipe nobody reads while the launch runs
    launch = popen([sys.executable, "sweeps/run.py", *sweep], cwd=REPO, env=env,
                   stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        db = tmp_path / "mlflow.db"
        deadline = time.time() + 300
        running = False
        while time.time() < deadline and launch.poll() is None and not running:  # a step reached MLflow
            time.sleep(1)
            if db.is_file():
                c = MlflowClient(f"sqlite:///{db}")
                runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])
                        if r.data.tags.get("mimsweep.kind") == "point"]
                running = any(r.info.status == "RUNNING" and "train_loss" in r.data.metrics for r in runs)
        assert running, "the point never showed a logged step while running"
        watched = run_cli("cluster/status.py", *sweep, "--watch", "--every", "1", timeout=900)
        launch.wait(timeout=600)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, (tmp_path / "launch.log").read_text()
    out = watched.stdout
    assert watched.returncode == 0, out + watched.stderr
    lines = out.splitlines()
    live = [lines[i + 1].split() for i, ln in enumerate(lines) if "running: point" in ln]
    assert live, out                                                  # step / loss / ETA of the running point
    label, seed, step, done, loss = live[0][:5]
    assert label == "60%" and seed == "0" and 0 < int(step) <= 60 and done.endswith("%") and float(loss) > 0
    assert live[0][-1] == "s" or live[0][-1] == "min", live[0]        # an ETA ("42 s", "1 min 05 s")
    refreshes = out.count("sweep mcm_mask_ratio (MLflow")
    assert refreshes >= 2, out                                        # it refreshed, then ...
    last = out.split("sweep mcm_mask_ratio (MLflow")[-1]
    assert "FINISHED" in last and "nothing queued or running in sweep mcm_mask_ratio: done watching" in last


@pytest.mark.parametrize("every", ["0", "-1"])
def test_watch_refuses_a_bad_interval(every):
    r = run_cli("cluster/status.py", "sweep=mcm_mask_ratio", "--watch", "--every", every)
    assert r.returncode == 2 and "--every" in r.stderr


def _store_with_a_running_launch(tmp_path, pid: int) -> tuple:
    """A real store whose sweep has a RUNNING launch run (of process `pid` on this host) and no point run
    yet: a local launch that has not started its first job."""
    import json
    import socket

    from mlflow.tracking import MlflowClient

    from core import tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri, create=True)
    c = MlflowClient(uri)
    exp = c.create_experiment("mcm_mask_ratio")
    parent = c.create_run(exp, tags={tracking.TAG + "kind": "launch", tracking.TAG + "sweep": "mcm_mask_ratio",
                                     tracking.TAG + "overrides": json.dumps([]), tracking.TAG + "host": socket.gethostname(),
                                     tracking.TAG + "pid": str(pid)}).info.run_id
    return c, parent


def test_watch_waits_while_the_launch_runs_even_before_its_points_have_runs(tmp_path):
    c, parent = _store_with_a_running_launch(tmp_path, os.getpid())   # this process: alive
    out = open(tmp_path / "watch.out", "w")
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    watch = popen([sys.executable, "cluster/status.py", "sweep=mcm_mask_ratio", f"output_root={tmp_path}",
                   "--watch", "--every", "0.5"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and watch.poll() is None and \
                (tmp_path / "watch.out").read_text().count("is still running") < 2:
            time.sleep(0.5)
        assert watch.poll() is None, (tmp_path / "watch.out").read_text()        # still watching, refreshed twice
        c.set_terminated(parent, "FINISHED")
        assert watch.wait(timeout=120) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
    text = (tmp_path / "watch.out").read_text()
    assert f"the launch (run {parent[:8]}) is still running" in text
    assert text.rstrip().endswith("nothing queued or running in sweep mcm_mask_ratio: done watching"), text


def test_watch_ignores_a_launch_whose_process_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                                        # its pid now names no process
    _store_with_a_running_launch(tmp_path, gone.pid)
    r = run_cli("cluster/status.py", "sweep=mcm_mask_ratio", f"output_root={tmp_path}", "--watch", "--every", "0.5",
                timeout=120)
    assert r.returncode == 0 and "is still running" not in r.stdout, r.stdout + r.stderr
    assert "done watching" in r.stdout
