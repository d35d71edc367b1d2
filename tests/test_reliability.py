"""Faults caused for real, on real stores: whatever kills a job, a resumed run holds every logged step up to
its last checkpoint exactly once, and the values an uninterrupted run logs.

- kill -9 of the launch (and its in-process job) at random moments, and exactly between a checkpoint's
  rename and the metric flush after it (core/faults.py fires a real SIGKILL there);
- Ctrl-C (SIGINT): the run ends KILLED, the resumed run logs the lost steps once;
- a full disk: output_root on a tmpfs too small for the next checkpoint (root: mounts it);
- a tracking server stopped in the middle of a run and started again: the job spools, goes on, replays,
  and the run ends FINISHED.
The long versions (20 kill trials, 32 concurrent launches) are `python bench/reliability.py`.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.reliability import _env, counts, finish, history, launch, point_run
from tests.conftest import popen


@pytest.fixture(autouse=True)
def _forked_launches(monkeypatch):
    """The launches below are forked from this worker's pre-imported Python (conftest popen): each a process
    of its own that is killed, interrupted and relaunched as a fresh one would be, without ~5 s of imports."""
    import bench.reliability
    monkeypatch.setattr(bench.reliability, "SPAWN", popen)

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    finish(out)
    return history(f"sqlite:///{out / 'mlflow.db'}")


def _assert_exactly_once(out: Path, reference: dict, uri: str | None = None):
    uri = uri or f"sqlite:///{out / 'mlflow.db'}"
    c, run = point_run(uri)
    assert run.info.status == "FINISHED"
    assert "mimsweep.failure" not in run.data.tags
    h = history(uri)
    assert counts(h) == (0, 0)
    assert h == reference                          # bit-identical values, each step once
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    assert not list(out.rglob("metrics.spool.jsonl"))
    left = [r.info.status for r in c.search_runs([run.info.experiment_id]) if r.info.status in ("RUNNING", "SCHEDULED")]
    assert left == []                              # the killed launches' runs were closed by the relaunch


def test_reference_logs_every_step_once(reference):
    assert counts(reference) == (0, 0) and len(reference["lr"]) == 120


def test_kill_between_checkpoint_rename_and_metric_flush_loses_nothing(tmp_path, reference):
    out = tmp_path / "out"
    p = launch(out, env=_env(MIMSWEEP_FAULT="checkpoint.renamed@3"))   # after the step-15 checkpoint is in place
    text = p.communicate(timeout=600)[0]
    assert p.returncode == -signal.SIGKILL, text
    c, run = point_run(f"sqlite:///{out / 'mlflow.db'}")
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert max(steps) == 10                        # steps 11-15 were in no flush: only the checkpoint has them
    finish(out)
    _assert_exactly_once(out, reference)


def test_a_launch_killed_after_its_points_ended_is_closed_by_the_next_launch(tmp_path):
    """SIGKILL after the last point finished, before the launch closed its own run (a kill at a random moment
    landed there once): the relaunch has nothing to do, and still marks that launch run FAILED with the reason."""
    out = tmp_path / "out"
    p = launch(out, "pretrain.max_steps=10", env=_env(MIMSWEEP_FAULT="launch.points_done"))
    text = p.communicate(timeout=600)[0]
    assert p.returncode == -signal.SIGKILL, text
    c, run = point_run(f"sqlite:///{out / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    kinds = lambda: {r.info.run_id: (r.data.tags["mimsweep.kind"], r.info.status)  # noqa: E731
                     for r in c.search_runs([run.info.experiment_id])}
    (killed,) = [rid for rid, (kind, status) in kinds().items() if kind == "launch" and status == "RUNNING"]
    again = finish(out, "pretrain.max_steps=10")
    assert "nothing to do" in again, again
    assert [status for _, status in kinds().values() if status in ("RUNNING", "SCHEDULED")] == []
    closed = c.get_run(killed)
    assert closed.info.status == "FAILED" and "ended without closing it" in closed.data.tags["mimsweep.failure"]


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_at_a_random_moment(tmp_path, reference, trial):
    out = tmp_path / "out"
    p = launch(out)
    # after start-up (forked: no imports; store, run creation: ~1-3 s), somewhere in or around pre-training
    time.sleep(random.Random(trial).uniform(3.0, 15.0))
    if p.poll() is None:                           # a launch that has ended: a kill after the end (a no-op)
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    finish(out)
    _assert_exactly_once(out, reference)


def test_ctrl_c_marks_the_run_killed_and_the_resume_logs_each_step_once(tmp_path, reference):
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    p = launch(out, "pretrain.checkpoint_every=40")
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("runs/*/*/checkpoint.pt")):
        time.sleep(0.1)                            # the step-40 checkpoint: steps 41.. are only buffered now
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    text = p.communicate(timeout=120)[0]
    c, run = point_run(uri)
    assert run.info.status == "KILLED", text
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 41))             # nothing past the checkpoint reached the store
    finish(out, "pretrain.checkpoint_every=40")
    _assert_exactly_once(out, reference)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs: run the tests as root (CI does)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_clearly_and_the_resume_is_exact(tmp_path, small_disk, reference):
    """output_root on a tmpfs with room for the launch's estimate; once the step-40 checkpoint is there,
    another process fills the disk to less than one checkpoint (~0.75 MiB): the step-80 write fails.
    The store is on the big disk (tracking.uri)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = launch(small_disk, "pretrain.checkpoint_every=40", uri=uri)
    deadline = time.time() + 120
    while time.time() < deadline and not list(small_disk.glob("runs/*/*/checkpoint.pt")):
        time.sleep(0.05)
    st = os.statvfs(small_disk)
    ballast = small_disk / "ballast"
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - 300_000), str(ballast)], check=True)
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 1, text
    assert "no space left on the device" in text and "output_root" in text, text
    assert "unexpected pos" not in text and "Traceback" not in text, text
    c, run = point_run(uri)
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["mimsweep.failure"]
    assert not list(small_disk.rglob("*.tmp"))               # the failed write removed its temp file
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 41))                        # exactly what the one checkpoint covers
    ballast.unlink()                                          # space freed
    finish(small_disk, "pretrain.checkpoint_every=40", uri=uri)
    _assert_exactly_once(small_disk, reference, uri)


def _server(root: Path, port: int) -> subprocess.Popen:
    import urllib.request
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError((root / "server.log").read_text()[-3000:])


@pytest.mark.parametrize("back", ["before the job ends", "after the job gave up"])
def test_server_outage_mid_run_spools_then_replays_and_the_run_finishes(tmp_path, reference, back):
    """The server dies hard while the point trains. Either it is back within tracking.outage_wait_s (the
    job spools, trains on, waits at its end, sends the spool and finishes), or not (the job exits saying
    so, the spool stays; the next launch's job sends it and finishes the run)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    out = tmp_path / "out"
    gives_up = back == "after the job gave up"
    p = launch(out, *(["tracking.outage_wait_s=3"] if gives_up else []), uri=uri)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:                # the run is training: some steps arrived
            time.sleep(0.5)
            try:
                c, run = point_run(uri)
                if c.get_metric_history(run.info.run_id, "train_loss"):
                    break
            except Exception:  # noqa: BLE001 - not created yet
                pass
        os.killpg(server.pid, signal.SIGKILL)        # the server dies, hard
        server.wait(timeout=30)
        if gives_up:
            text = p.communicate(timeout=600)[0]
            assert p.returncode == 1, text
            assert "metrics go to" in text and "Relaunch the sweep when the server is back" in text, text
            assert (next(out.glob("runs/*/*/metrics.spool.jsonl"))).stat().st_size > 0
            server = _server(tmp_path, port)
            finish(out, uri=uri)
        else:
            time.sleep(12)                           # longer than the client's retries
            server = _server(tmp_path, port)         # back, same store
            text = p.communicate(timeout=600)[0]
            assert p.returncode == 0, text
            assert "metrics go to" in text           # it did spool
        _assert_exactly_once(out, reference, uri)
    finally:
        for proc in (p, server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_kill_while_creating_the_store_leaves_no_broken_database(tmp_path, reference):
    """MLflow builds a new SQLite store by running its migrations for seconds; a launch killed in the
    middle used to leave a half-made database that every later launch refused ("table ... already
    exists"). It is built as a temp file now and renamed: the kill here is after the schema, before the rename."""
    out = tmp_path / "out"
    p = launch(out, env=_env(MIMSWEEP_FAULT="store.created"))
    text = p.communicate(timeout=600)[0]
    assert p.returncode == -signal.SIGKILL, text
    assert not (out / "mlflow.db").exists()
    finish(out)
    _assert_exactly_once(out, reference)
    assert not list(out.glob(".mlflow.db.*"))
