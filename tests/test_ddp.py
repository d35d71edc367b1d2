"""DistributedDataParallel inside one job, on CPU with gloo and 2 processes (as 2 GPUs would run)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, popen


def _run_two_ranks(tmp_path, *overrides, env=None, timeout=600):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("ddp")).info.run_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        full = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "MIMSWEEP_PROGRESS": "0", **(env or {})}
        procs.append(popen([sys.executable, "tests/ddp_worker.py", uri, run_id, str(tmp_path / "work"), str(tmp_path),
                            *overrides], cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the ranks did not finish: one is blocked waiting for the other")
    return c, run_id, [p.returncode for p in procs], outs


def test_two_process_ddp_trains_one_model_and_tracks_once(tmp_path):
    c, run_id, codes, outs = _run_two_ranks(tmp_path)
    assert codes == [0, 0], "\n".join(outs)

    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)           # gradients were averaged across ranks
    m0, m1 = (torch.load(tmp_path / f"mask{r}.pt") for r in range(2))
    assert m0.shape == m1.shape and not torch.equal(m0, m1)      # each rank masks its own way
    ckpt = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4                                     # rank 0 checkpointed
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # every rank's RNG state

    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "knn_top1" in run.data.metrics                        # rank 0 evaluated
    assert [m.step for m in c.get_metric_history(run_id, "train_loss")] == [2, 4]  # logged once, not per rank


def test_a_parameter_a_config_leaves_unused_does_not_stop_ddp(tmp_path):
    # MCM "w/o forward": the encode channel takes no part in the forward pass (Tab. 6)
    c, run_id, codes, outs = _run_two_ranks(tmp_path, "method.encode_channel_forward=false")
    assert codes == [0, 0], "\n".join(outs)
    assert c.get_run(run_id).info.status == "FINISHED"


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    c, run_id, codes, outs = _run_two_ranks(tmp_path, env={"NAN_AT_STEP": "2"}, timeout=300)
    assert codes[0] != 0 and codes[1] != 0, "\n".join(outs)
    assert all("NonFiniteLoss" in o for o in outs), "\n".join(outs)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["mimsweep.failure"]
