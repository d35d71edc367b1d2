"""Simultaneous launches (issue 19, item 6): each waits its turn for the store, none drops a point.

Eight real launches start at the same moment against one fresh SQLite store, then against one MLflow
server; every launch must exit 0 and every point of every launch must be tracked and FINISHED. The points
count FLOPs (task=flops) instead of training, so the test measures the launches, not the training.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY, popen

LAUNCHES = 8
pytestmark = pytest.mark.xdist_group("timing")  # its launches one after another, on one worker


def _launch_all(tmp_path, extra: list[str]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [popen([sys.executable, "sweeps/run.py", "sweep=mcm_recon_range", *TINY, "task=flops",
                    f"tracking.experiment=launch{i}", f"output_root={tmp_path}", *extra],
                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(LAUNCHES)]
    t0 = time.perf_counter()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1500)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    print(f"{LAUNCHES} simultaneous launches: all ended after {time.perf_counter() - t0:.0f} s")
    return out


def _every_point_tracked(uri: str, results) -> None:
    for i, res in enumerate(results):
        assert res.returncode == 0, f"launch {i}:\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    c = MlflowClient(uri)
    for i in range(LAUNCHES):
        exp = c.get_experiment_by_name(f"launch{i}")
        assert exp is not None, f"launch {i} left no experiment"
        runs = c.search_runs([exp.experiment_id])
        points = [r for r in runs if r.data.tags.get("mimsweep.kind") == "point"]
        assert sorted(r.data.tags["mimsweep.label"] for r in points) == ["all", "masked"], i
        assert {r.info.status for r in runs if r.data.tags.get("mimsweep.kind") in ("point", "launch")} == {"FINISHED"}
        assert all("flops_per_image" in r.data.metrics or r.data.metrics for r in points)


def test_simultaneous_launches_on_a_fresh_sqlite_store(tmp_path):
    results = _launch_all(tmp_path, [])
    _every_point_tracked(f"sqlite:///{tmp_path / 'mlflow.db'}", results)


@pytest.mark.server
def test_simultaneous_launches_against_a_server(tmp_path, mlflow_server):
    results = _launch_all(tmp_path, [f"tracking.uri={mlflow_server}"])
    _every_point_tracked(mlflow_server, results)


def _one_launch(tmp_path, timeout=300) -> subprocess.Popen:
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return popen([sys.executable, "sweeps/run.py", "sweep=mcm_recon_range", *TINY, "task=flops",
                  f"output_root={tmp_path}"], cwd=REPO, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_existing_store_is_opened_without_the_creation_lock(tmp_path):
    """The lock beside the database guards its creation only: a launch on an existing store goes ahead while
    another process holds that lock (it used to queue behind it, and gave up after 600 s)."""
    from filelock import FileLock

    from core import tracking
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.open_store(uri, create=True)
    with FileLock(str(tmp_path / "mlflow.db") + ".lock"):
        proc = _one_launch(tmp_path)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "waiting for another launch" not in out


def test_a_launch_waits_for_the_store_another_launch_is_creating(tmp_path):
    """While another process holds the creation lock of a store that does not exist yet, a launch says it
    waits and waits (no time limit); when the lock is released it creates the store and runs its points."""
    from filelock import FileLock
    lock = FileLock(str(tmp_path / "mlflow.db") + ".lock")
    lock.acquire()
    try:
        proc = _one_launch(tmp_path)
        deadline = time.time() + 240
        line = ""
        while time.time() < deadline and "waiting for another launch" not in line:
            line = proc.stdout.readline()
        assert "waiting for another launch" in line, line
        time.sleep(5)
        assert proc.poll() is None                      # still waiting, not failed
    finally:
        lock.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("mcm_recon_range").experiment_id])
    assert sorted(r.info.status for r in runs if r.data.tags.get("mimsweep.kind") == "point") == ["FINISHED"] * 2


def test_a_new_store_is_a_copy_of_what_mlflow_makes(tmp_path, monkeypatch):
    """A new SQLite store is copied from an empty store MLflow made once (its ~100 schema migrations take
    seconds at every new output_root): the same schema and rows as one MLflow makes in its place, the Default
    experiment's artifacts beside the database."""
    import sqlite3

    from core.tracking import store
    monkeypatch.setenv("MIMSWEEP_CACHE", str(tmp_path / "cache"))

    def dump(db):
        con = sqlite3.connect(db)
        # SQLAlchemy writes a table's constraints in set order, which differs between two processes: each
        # CREATE TABLE is compared as its set of lines
        rows = sorted("\n".join(sorted(x.strip().rstrip(",") for x in line.split("\n"))) if line.startswith("CREATE TABLE") else line
                      for line in con.iterdump() if "INSERT INTO \"experiments\"" not in line)
        exp = con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments").fetchall()
        con.close()
        return rows, exp

    store._new_sqlite(tmp_path / "by_mlflow.db", (tmp_path / "mlartifacts").as_uri())
    t0 = time.perf_counter()
    store.open_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", create=True)     # makes the template
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = store.open_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", create=True)  # copies it
    second = time.perf_counter() - t0
    print(f"new store: {first:.2f} s (the template made), then {second:.2f} s")
    assert list((tmp_path / "cache").glob("mlflow-*-empty.db"))
    made, made_exp = dump(tmp_path / "by_mlflow.db")
    copied, copied_exp = dump(tmp_path / "b" / "mlflow.db")
    assert copied == made
    assert copied_exp == [(0, "Default", f"{(tmp_path / 'b' / 'mlartifacts').as_uri()}/0", "active")]
    assert made_exp == [(0, "Default", f"{(tmp_path / 'mlartifacts').as_uri()}/0", "active")]
    exp = c.create_experiment("x")                                             # MLflow takes it as its own
    assert c.get_experiment(exp).name == "x" and c.get_experiment("0").name == "Default"
    assert second < first
