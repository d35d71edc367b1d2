"""Runs written in bulk (core/tracking/bulk.py create_runs / set_tags) are the runs the client writes: compared
field by field through a real MLflow server's REST API over the same SQLite store, artifacts included."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY

pytestmark = pytest.mark.server


def _serve(db: Path, artifacts: Path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", str(artifacts)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not come up")


@pytest.fixture
def store(tmp_path, compose):
    from core import tracking
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.open_store(uri, create=True)
    exp = c.create_experiment("bulk", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = compose("sweep=mcm_mask_ratio", *TINY)
    return c, exp, cfg, tmp_path


def _comparable(run) -> dict:
    d = run.to_dictionary()
    info = {k: v for k, v in d["info"].items() if k not in ("run_id", "run_uuid", "start_time", "artifact_uri")}
    return {"info": info, "data": d["data"], "inputs": d.get("inputs")}


def test_bulk_runs_are_the_runs_the_client_writes(store):
    from core import tracking
    c, exp, cfg, tmp = store
    parent = c.create_run(exp, run_name="launch").info.run_id
    args = (parent, "mcm_mask_ratio", "60%", ["method.mask_ratio=0.6"], "sig0", cfg)
    identity = {"pretrain_signature": "p0", "eval_signature": "e0", "workdir": "/w/0", "estimate_s": "12"}
    one = tracking.create_point_run(c, exp, *args, identity=identity, name="mask_ratio=60% seed=0")
    ids = [uuid.uuid4().hex for _ in range(3)]
    spec = tracking.point_run(*args, identity=identity, name="mask_ratio=60% seed=0")
    assert tracking.bulk.writes_in_bulk(c)
    assert tracking.bulk.create_runs(c, exp, [{**spec, "run_id": rid, "status": "SCHEDULED"} for rid in ids])

    proc, uri = _serve(tmp / "mlflow.db", tmp / "served")
    try:
        rest = MlflowClient(uri)
        by_client = rest.get_run(one)
        assert by_client.info.status == "SCHEDULED" and len(by_client.data.params) > 50
        for rid in ids:
            by_bulk = rest.get_run(rid)
            assert _comparable(by_bulk) == _comparable(by_client)
            assert by_bulk.info.artifact_uri == by_client.info.artifact_uri.replace(one, rid)
            assert [a.path for a in rest.list_artifacts(rid)] == ["config.yaml"]
            assert (rest.download_artifacts(rid, "config.yaml", str(tmp / rid)) and
                    Path(tmp / rid / "config.yaml").read_text() == Path(
                        rest.download_artifacts(one, "config.yaml", str(tmp / "one"))).read_text())
        # the searches a relaunch and status.py make find them like any other run
        found = rest.search_runs([exp], filter_string="tags.`mimsweep.label` = '60%' and attributes.status = 'SCHEDULED'")
        assert sorted(r.info.run_id for r in found) == sorted([one, *ids])
        kids = rest.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        assert len(kids) == 4

        # set_tags replaces a tag as set_tag does, and adds new ones
        c.set_tag(one, "mimsweep.slurm_job_all", "7_0")
        c.set_tag(one, "mimsweep.slurm_job_all", "9_0")
        c.set_tag(ids[0], "mimsweep.slurm_job_all", "7_1")
        assert tracking.bulk.set_tags(c, {ids[0]: {"mimsweep.slurm_job_all": "9_1"},
                                          ids[1]: {"mimsweep.slurm_job_all": "9_2", "mimsweep.x": "y"}})
        assert rest.get_run(one).data.tags["mimsweep.slurm_job_all"] == "9_0"
        assert rest.get_run(ids[0]).data.tags["mimsweep.slurm_job_all"] == "9_1"
        assert {k: v for k, v in rest.get_run(ids[1]).data.tags.items() if k in ("mimsweep.slurm_job_all", "mimsweep.x")} \
            == {"mimsweep.slurm_job_all": "9_2", "mimsweep.x": "y"}
        assert "mimsweep.slurm_job_all" not in rest.get_run(ids[2]).data.tags

        # a server store: nothing in bulk, the caller writes run by run
        assert not tracking.bulk.writes_in_bulk(rest)
        assert tracking.bulk.create_runs(rest, exp, [{**spec, "run_id": uuid.uuid4().hex, "status": "SCHEDULED"}]) is False
        assert tracking.bulk.set_tags(rest, {one: {"mimsweep.z": "1"}}) is False
        assert "mimsweep.z" not in rest.get_run(one).data.tags
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_bad_row_writes_nothing(store):
    """MLflow's validators run before the transaction: one bad param key, and none of the runs exists; a
    value over MLflow's limit is cut as the client's log_batch cuts it."""
    from mlflow.exceptions import MlflowException

    from core import tracking
    c, exp, cfg, _ = store
    spec = tracking.point_run(None, "mcm_mask_ratio", "60%", [], "sig0", cfg)
    good = {**spec, "run_id": uuid.uuid4().hex, "status": "SCHEDULED"}
    bad = {**spec, "run_id": uuid.uuid4().hex, "status": "SCHEDULED", "params": {**spec["params"], "k" * 300: "v"}}
    with pytest.raises(MlflowException):
        tracking.bulk.create_runs(c, exp, [good, bad])
    assert c.search_runs([exp]) == []
    long = {**spec, "run_id": uuid.uuid4().hex, "status": "SCHEDULED", "params": {**spec["params"], "x": "v" * 7000}}
    assert tracking.bulk.create_runs(c, exp, [long])
    by_client = c.create_run(exp).info.run_id
    c.log_param(by_client, "x", "v" * 7000)
    assert c.get_run(long["run_id"]).data.params["x"] == c.get_run(by_client).data.params["x"] == "v" * 6000
