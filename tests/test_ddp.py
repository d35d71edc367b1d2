"""DistributedDataParallel inside one job, on CPU with gloo and 2 processes (as 2 GPUs would run)."""
import os
import socket
import subprocess
import sys

import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO


def test_two_process_ddp_trains_one_model_and_tracks_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("ddp")).info.run_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "MIMSWEEP_PROGRESS": "0"}
        procs.append(subprocess.Popen([sys.executable, "tests/ddp_worker.py", uri, run_id, str(tmp_path / "work"),
                                       str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)

    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)           # gradients were averaged across ranks
    init = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert init["step"] == 4                                     # rank 0 checkpointed

    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "knn_top1" in run.data.metrics                        # rank 0 evaluated
    assert [m.step for m in c.get_metric_history(run_id, "train_loss")] == [2, 4]  # logged once, not per rank
