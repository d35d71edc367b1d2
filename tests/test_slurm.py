"""Against the real local SLURM cluster (cluster/local_slurm.sh) and a real MLflow server.

A launch queues one array and returns; the tasks report into MLflow; a second launch submits nothing;
a failing point is the only one resubmitted; a job signalled mid-training checkpoints, requeues and
ends with exactly the metrics of an uninterrupted job; bad requests are refused before submission.
"""
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAILING_POINTS, TINY, TINY_SLURM, paced, queued_jobs, replacing, run_cli

pytestmark = pytest.mark.slurm
# 2 cores here: one CPU and a little memory per task lets two tasks run side by side.
# reuse=experiment: the session's MLflow server is shared by many tests, and a launch would otherwise evaluate
# another test's finished pre-training of the same config instead of training its own (core/tracking/identity.py).
SMALL = ["cluster=slurm", "cluster.cpus_per_task=1", "cluster.mem_gb=2", "cluster.time_min=20", "reuse=experiment"]


def _point_runs(uri, exp):
    c = MlflowClient(uri)
    e = c.get_experiment_by_name(exp)
    runs = c.search_runs([e.experiment_id]) if e else []
    return [r for r in runs if r.data.tags.get("mimsweep.kind") == "point"]


def _wait_runs(uri, exp, n, statuses=("FINISHED", "FAILED"), timeout=600, release=True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _point_runs(uri, exp)
        if len(runs) == n and all(r.info.status in statuses for r in runs):
            return runs
        if release:
            _release_requeued()
        time.sleep(1)
    pytest.fail(f"runs of {exp} did not end in {timeout}s: {[(r.data.tags.get('mimsweep.label'), r.info.status) for r in _point_runs(uri, exp)]}")


def _release_requeued():
    """SLURM holds a requeued job ~2 min (BeginTime); a test has no reason to wait for that."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %r"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        jid, _, reason = line.partition(" ")
        if reason.strip() == "BeginTime":
            subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], capture_output=True)


def _queued_ids(stdout):
    m = re.search(r"array job\(s\): ([\d, ]+)", stdout)
    return [j.strip() for j in m.group(1).split(",")] if m else []


def test_smoke_sweep_runs_as_one_array_then_relaunch_submits_nothing(slurm_cluster, mlflow_server, tmp_path):
    args = ["sweeps/run.py", "sweep=mcm_mask_ratio", *TINY_SLURM, *SMALL, f"tracking.uri={mlflow_server}",
            "tracking.experiment=slurm_e2e", f"output_root={tmp_path}"]
    t0 = time.time()
    first = run_cli(*args)
    submit_s = time.time() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    ids = _queued_ids(first.stdout)
    assert len(ids) == 1, first.stdout                       # one array for the whole launch
    print(f"submit took {submit_s:.1f}s, array {ids[0]}")

    # while the array is still queued or running, a relaunch leaves it alone
    during = run_cli(*args)
    assert during.returncode == 0
    assert "queued 0" not in during.stdout and not _queued_ids(during.stdout), during.stdout

    runs = _wait_runs(mlflow_server, "slurm_e2e", 4)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mimsweep.slurm_job_all"].split("_")[0] for r in runs} == {ids[0]}
    assert all("knn_top1" in r.data.metrics and r.data.metrics["queue_s"] >= 0 for r in runs)
    c = MlflowClient(mlflow_server)
    for r in runs:  # each task attaches its SLURM output to its run as it ends (just after the run's status)
        log = f"logs/slurm-{r.data.tags['mimsweep.slurm_job_all']}.out"
        deadline = time.time() + 60
        while time.time() < deadline and log not in [a.path for a in c.list_artifacts(r.info.run_id, "logs")]:
            time.sleep(1)
        assert "sig=" in Path(c.download_artifacts(r.info.run_id, log, str(tmp_path))).read_text()

    after = run_cli(*args)
    assert after.returncode == 0
    assert "nothing to do" in after.stdout and len(re.findall(r"^  skip ", after.stdout, re.M)) == 4


def test_only_the_failed_point_is_resubmitted(slurm_cluster, mlflow_server, tmp_path):
    args = ["sweeps/run.py", "sweep=mcm_recon_range", "~sweep.grid", FAILING_POINTS, *TINY_SLURM, *SMALL,
            f"tracking.uri={mlflow_server}", "tracking.experiment=slurm_retry", f"output_root={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    runs = {r.data.tags["mimsweep.label"]: r for r in _wait_runs(mlflow_server, "slurm_retry", 2)}
    assert runs["masked"].info.status == "FAILED" and runs["all"].info.status == "FINISHED"
    again = run_cli(*args)
    assert "queued 1 point(s)" in again.stdout, again.stdout
    plan = " ".join(again.stdout.split())
    assert "resume masked" in plan and "skip all" in plan


def _wait_progress(uri, exp, at_least, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _point_runs(uri, exp)
        if runs and runs[0].data.metrics.get("progress", 0) >= at_least:
            return runs[0]
        time.sleep(1)
    pytest.fail(f"{exp}: no progress >= {at_least} in {timeout}s")


@pytest.mark.parametrize("interrupt", ["usr2", "scontrol_requeue"])
def test_interrupted_job_resumes_with_identical_metrics(slurm_cluster, mlflow_server, tmp_path, interrupt):
    # interrupted after the first checkpoints, the job paced (12 s or more of training): a job that has already
    # ended when the interrupt arrives would be rerun as a finished point (no restart to check)
    common = ["sweeps/run.py", *TINY_SLURM, *SMALL, "pretrain.epochs=10", "pretrain.max_steps=40", "pretrain.log_every=2",
              "pretrain.checkpoint_every=4", "method.target=norm_pixel", f"output_root={tmp_path}"]
    # The reference in a store of its own: in the same store the second launch would reuse its pre-training
    # (core/tracking/identity.py) instead of training the point it is to interrupt.
    ref_uri = f"sqlite:///{tmp_path}/ref.db"
    ref = run_cli(*common, f"tracking.uri={ref_uri}", f"tracking.experiment=ref_{interrupt}")
    hit = run_cli(*common, f"tracking.uri={mlflow_server}", f"tracking.experiment=hit_{interrupt}", env=paced())
    assert ref.returncode == 0 and hit.returncode == 0, ref.stderr + hit.stderr
    job = _queued_ids(hit.stdout)[0] + "_0"
    run = _wait_progress(mlflow_server, f"hit_{interrupt}", 0.1)
    if interrupt == "usr2":
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    ref_run = _wait_runs(ref_uri, f"ref_{interrupt}", 1)[0]
    hit_run = _wait_runs(mlflow_server, f"hit_{interrupt}", 1)[0]
    assert hit_run.info.run_id == run.info.run_id             # resumed into the same MLflow run
    assert hit_run.info.status == "FINISHED"
    assert int(hit_run.data.tags["mimsweep.slurm_restarts"]) >= 1
    assert int(hit_run.data.tags.get("mimsweep.resumed_from_step", "0")) > 0
    c, c_ref = MlflowClient(mlflow_server), MlflowClient(ref_uri)
    for key in ("train_loss", "lr"):
        h_ref = [(m.step, m.value) for m in c_ref.get_metric_history(ref_run.info.run_id, key)]
        h_hit = [(m.step, m.value) for m in c.get_metric_history(hit_run.info.run_id, key)]
        assert h_hit == h_ref, key                            # every step once, same values
    for key in ("knn_top1", "linear_top1"):
        assert hit_run.data.metrics[key] == ref_run.data.metrics[key], key
    print(f"{interrupt}: job {job}, restarts {hit_run.data.tags['mimsweep.slurm_restarts']}, resumed from step "
          f"{hit_run.data.tags['mimsweep.resumed_from_step']}, final loss {hit_run.data.metrics['train_loss']}")


def test_dry_run_prints_the_array_script_and_submits_nothing(slurm_cluster, tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_decoder_depth", "preset=smoke", *SMALL, "cluster.array_parallelism=2",
                  "dry_run=true", f"output_root={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --array=0-3%2" in res.stdout
    assert "#SBATCH --signal=B:USR2@120" in res.stdout and "-m cluster.task" in res.stdout
    assert "1 sbatch call(s) for 4 point(s)" in res.stdout
    assert not queued_jobs(tmp_path)                            # no job of this launch


def test_separate_evaluation_array_is_chained_per_task(slurm_cluster, tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_decoder_depth", "preset=smoke", *SMALL, "cluster.separate_eval=true",
                  "dry_run=true", f"output_root={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert "2 sbatch call(s) for 4 point(s)" in res.stdout
    assert "--dependency=aftercorr:" in res.stdout and "--kill-on-invalid-dep=yes" in res.stdout


@pytest.mark.parametrize("override, message", [
    ("cluster.partition=nosuchpart", "cluster.partition='nosuchpart' is invalid"),
    ("cluster.mem_gb=100000", "cluster.mem_gb=100000 is invalid: is more memory than the largest node"),
    ("cluster.cpus_per_task=4096", "cluster.cpus_per_task=4096 is invalid"),
    ("cluster.gpus_per_task=64", "cluster.gpus_per_task=64 is invalid"),
])
def test_impossible_requests_are_refused_before_submission(slurm_cluster, tmp_path, override, message):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", *replacing(SMALL, override),
                  f"output_root={tmp_path}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not queued_jobs(tmp_path)                            # no job of this launch


def test_missing_sbatch_is_refused(tmp_path):
    import os
    import sys
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin/nonexistent"}
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", "cluster=slurm",
                  f"output_root={tmp_path}", env=env)
    assert res.returncode == 2
    assert "`sbatch` is not on PATH" in res.stderr


def test_unreachable_tracking_server_is_refused(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", "tracking.uri=http://127.0.0.1:9",
                  f"output_root={tmp_path}", env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "tracking.uri='http://127.0.0.1:9' is invalid: the MLflow store cannot be reached" in res.stderr


def test_grids_larger_than_max_array_size_are_split(compose, tmp_path):
    from sweeps.plan import Planned
    from cluster.slurm import submit
    from sweeps.grid import Point
    cfg = compose("cluster=slurm")
    todo = [Planned(Point(str(i), 0, []), cfg, f"sig{i}", run_id=f"{i:032d}") for i in range(7)]
    arrays = submit(todo, cfg.cluster, "sqlite:///x.db", tmp_path, "s", dry_run=True, max_array=4)
    assert [a["tasks"] for a in arrays] == [3, 3, 1]        # indices 0..MaxArraySize-1, here 0..2
    assert "#SBATCH --array=0-2%3" in arrays[0]["script"] and "#SBATCH --array=0-0%1" in arrays[2]["script"]


def test_status_tail_and_cancel(slurm_cluster, mlflow_server, tmp_path):
    args = ["sweep=mcm_masking_strategy", *TINY_SLURM, *SMALL, "pretrain.epochs=50", "pretrain.max_steps=400",
            "pretrain.checkpoint_every=2", "pretrain.log_every=2", f"tracking.uri={mlflow_server}",
            "tracking.experiment=slurm_status", f"output_root={tmp_path}"]
    launched = run_cli("sweeps/run.py", *args, env=paced())       # the tasks run until they are cancelled
    assert launched.returncode == 0, launched.stderr
    job = _queued_ids(launched.stdout)[0]
    # the launch's hint works as printed: it carries the overrides that select the same grid
    hint = launched.stdout.split("follow them with: ", 1)[1].split("  (MLflow", 1)[0]
    assert hint.startswith("python cluster/status.py ")
    printed = shlex.split(hint)[1:]
    deadline = time.time() + 300
    while time.time() < deadline:
        status = run_cli(*printed)
        if "RUNNING" in status.stdout and "%" in status.stdout.split("progress", 1)[1]:
            break
        time.sleep(2)
    assert status.returncode == 0, status.stderr
    lines = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln.strip().startswith(("random", "block"))}
    assert set(lines) == {"random", "block"} and f"{job}_" in status.stdout
    tail = run_cli("cluster/status.py", *args, "--tail", "random")
    assert f"{job}_0.out" in tail.stdout and "[mimsweep] random" in tail.stdout
    cancel = run_cli("cluster/status.py", *args, "--cancel", "all")
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    time.sleep(3)
    left = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
    assert left.strip() == ""
    assert {r.info.status for r in _point_runs(mlflow_server, "slurm_status")} == {"KILLED"}


def test_separate_evaluation_runs_after_its_own_pretraining_and_never_waits_on_a_failed_one(
        slurm_cluster, mlflow_server, tmp_path):
    args = ["sweeps/run.py", "sweep=mcm_recon_range", "~sweep.grid", FAILING_POINTS, *TINY_SLURM, *SMALL,
            "cluster.separate_eval=true", "cluster.eval.cpus_per_task=1", "cluster.eval.mem_gb=2",
            f"tracking.uri={mlflow_server}", "tracking.experiment=slurm_chain", f"output_root={tmp_path}"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    pre, ev = _queued_ids(res.stdout)
    runs = {r.data.tags["mimsweep.label"]: r for r in _wait_runs(mlflow_server, "slurm_chain", 2)}
    assert runs["all"].info.status == "FINISHED" and "knn_top1" in runs["all"].data.metrics
    assert runs["all"].data.tags["mimsweep.slurm_job_evaluate"].startswith(ev + "_")
    assert runs["masked"].info.status == "FAILED"
    # the evaluation of the failed point is cancelled, not left pending; the accounting (slurmdbd) learns that a
    # task ended a moment after the queue forgets it (once: squeue empty, sacct still RUNNING), so ask it again
    deadline = time.time() + 60
    while True:
        states = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ev], capture_output=True,
                                text=True).stdout
        if ("CANCELLED" in states and "COMPLETED" in states) or time.time() > deadline:
            break
        time.sleep(1)
    assert "CANCELLED" in states and "COMPLETED" in states, states


def test_hydra_multirun_over_slurm_runs_each_point_through_the_launch_path(slurm_cluster, tmp_path):
    """`-m hydra/launcher=submitit_slurm` (an ad-hoc grid): one SLURM job per value, each running its point
    with cluster=local inside the job, so tracking and skip are those of a launch; a relaunch runs nothing."""
    args = ["sweeps/run.py", "-m", "hydra/launcher=submitit_slurm", "method.mask_ratio=0.6,0.75", *TINY,
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20",
            f"output_root={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = _point_runs(uri, "mimsweep")
    assert sorted(r.data.params["method.mask_ratio"] for r in runs) == ["0.6", "0.75"]
    assert {r.info.status for r in runs} == {"FINISHED"} and all("knn_top1" in r.data.metrics for r in runs)
    logs = sorted((tmp_path / "multirun").rglob(".submitit/*/*_log.out"))
    assert len(logs) == 2
    assert all(re.search(r"new +default", p.read_text()) for p in logs)   # the launch's plan, inside each job
    jobs = {p.parent.name.split("_")[0] for p in logs}
    assert len(jobs) == 1                                                # one array for the grid
    job, deadline = jobs.pop(), time.time() + 60
    while True:  # submitit returns once the results are written; SLURM may still be ending the tasks
        states = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], capture_output=True,
                                text=True).stdout.split()
        if time.time() > deadline or not any(s.endswith(("|RUNNING", "|COMPLETING")) for s in states):
            break
        time.sleep(1)
    assert len(states) == 2 and all(s.endswith("|COMPLETED") for s in states), states

    again = run_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_point_runs(uri, "mimsweep")) == 2                        # skipped: no new run
    logs2 = sorted((tmp_path / "multirun").rglob(".submitit/*/*_log.out"))
    assert sum("nothing to do" in p.read_text() for p in logs2) == 2


def test_an_evaluation_change_submits_only_evaluation_arrays_chained_after_running_pretrainings(
        slurm_cluster, mlflow_server, tmp_path):
    """While a sweep's pre-trainings still run, a launch with another evaluation waits for them (afterok on
    each task) instead of pre-training again; once they finished, a further change is one evaluation array."""
    base = ["sweeps/run.py", "sweep=mcm_recon_range", *TINY_SLURM, *SMALL, "cluster.eval.cpus_per_task=1",
            "cluster.eval.mem_gb=2", "pretrain.epochs=20", "pretrain.max_steps=24",
            f"tracking.uri={mlflow_server}", "tracking.experiment=slurm_identity",
            f"output_root={tmp_path}"]
    first = run_cli(*base, env=paced(0.5))     # 12 s or more of pre-training: still running at the next launch
    assert first.returncode == 0, first.stdout + first.stderr
    (array,) = _queued_ids(first.stdout)
    chained = run_cli(*base, "evaluate.linear.epochs=3")           # the pre-training tasks are still queued/running
    assert chained.returncode == 0, chained.stdout + chained.stderr
    plan = [ln for ln in chained.stdout.splitlines() if ln.startswith("  new ")]
    assert len(plan) == 2 and all(f"pretrain after task {array}_" in ln for ln in plan), chained.stdout
    waiting = _queued_ids(chained.stdout)
    assert len(waiting) == 2                                       # one evaluation array per pre-training task
    for job in waiting:
        dep = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        assert re.search(rf"Dependency=afterok:{array}_\d", dep) or "Dependency=(null)" in dep, dep  # or already met
    runs = _wait_runs(mlflow_server, "slurm_identity", 4)
    assert {r.info.status for r in runs} == {"FINISHED"}
    c = MlflowClient(mlflow_server)
    trainers = {r.info.run_id: r for r in runs if "mimsweep.checkpoint" in r.data.tags}
    evaluators = [r for r in runs if "mimsweep.pretrained_by" in r.data.tags]
    assert len(trainers) == 2 and len(evaluators) == 2
    for r in evaluators:
        assert r.data.tags["mimsweep.pretrained_by"] in trainers
        assert r.data.tags["mimsweep.slurm_job_evaluate"].split("_")[0] in waiting
        assert c.get_metric_history(r.info.run_id, "train_loss") == [] and "linear_top1" in r.data.metrics
        assert r.data.metrics["knn_top1"] == trainers[r.data.tags["mimsweep.pretrained_by"]].data.metrics["knn_top1"]

    later = run_cli(*base, "evaluate.linear.epochs=4")             # all pre-trainings finished: reuse them
    assert later.returncode == 0, later.stdout + later.stderr
    assert "queued 2 point(s) as 1 array job(s)" in later.stdout, later.stdout
    assert sum("pretrain reuse (run" in ln for ln in later.stdout.splitlines()) == 2
    (ev,) = _queued_ids(later.stdout)
    runs = _wait_runs(mlflow_server, "slurm_identity", 6)
    new = [r for r in runs if r.data.params.get("evaluate.linear.epochs") == "4"]
    assert len(new) == 2 and {r.info.status for r in new} == {"FINISHED"}
    assert all(r.data.tags["mimsweep.slurm_job_evaluate"].startswith(ev + "_") for r in new)
    assert all(c.get_metric_history(r.info.run_id, "train_loss") == [] for r in new)
    assert sum("mimsweep.checkpoint" in r.data.tags for r in runs) == 2   # pre-trained twice in all: 0 more


def test_a_controller_that_does_not_answer_is_named_as_such(slurm_cluster, tmp_path):
    """SLURM_CONF pointing at a port where no controller listens: the error says to start the controller,
    not to change a resource request, and comes at once (sinfo alone retries for ~10 s)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    path = re.search(r"SLURM_CONF\s*=\s*(\S+)", conf).group(1)
    text = open(path).read() + f"\nSlurmctldPort={port}\n"
    dead = tmp_path / "slurm.conf"
    dead.write_text(text)
    t0 = time.perf_counter()
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", *SMALL, f"output_root={tmp_path / 'o'}",
                  env={"SLURM_CONF": str(dead)})
    took = time.perf_counter() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: cluster='slurm' is invalid: the SLURM controller does not answer"), res.stderr
    assert "bash cluster/local_slurm.sh up" in res.stderr and "gpus_per_task" not in res.stderr
    assert not (tmp_path / "o").exists()
    print(f"dead controller: refused in {took:.1f} s")
